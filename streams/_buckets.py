"""The KV buckets and the object stores (files, the stage cache): names, what their values hold,
and how each is created with JOBCAST_STREAM_REPLICAS replicas on first use."""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from streams._config import STREAM_NAME_IN_USE, raise_replicas, refuse_placement, stream_replicas
from streams._env import env_float
from streams._supervisor import TaskState

T = TypeVar("T")


WORKERS_BUCKET = "JOBCAST_WORKERS"
"""KV bucket of worker heartbeats, one key per worker (`<pool>.<name>`)."""
WORKER_TTL_S = 15.0
"""A worker that has not refreshed its key this long is gone; workers refresh every TTL/3.
JOBCAST_WORKER_TTL_S overrides it (every process of a deployment must agree)."""


def worker_ttl() -> float:
    """The heartbeat TTL in force."""
    return env_float("JOBCAST_WORKER_TTL_S", WORKER_TTL_S)


CALLBACKS_BUCKET = "JOBCAST_CALLBACKS"
"""KV bucket of webhook claims: the API instance that creates a job's key sends its callback."""
CALLBACK_CLAIM_TTL_S = 120.0
"""A claim expires this long after its instance stopped refreshing it (it crashed mid-delivery)."""


class WorkerInfo(msgspec.Struct, kw_only=True):
    """A worker's heartbeat: the value of its key in the workers bucket."""

    name: str
    pool: str
    slots: int
    running: list[str]
    """Ids of the jobs it runs now."""
    host: str
    pid: int
    started_at: float
    last_seen: float
    tasks: dict[str, TaskState] = {}
    """Its supervised tasks (fetch loop, heartbeat): running, or restarting since when and why."""
    cpu_percent: float = 0.0
    """Its process's CPU use over the last usage window, in percent of one core (0: a worker that
    predates the field)."""
    rss_mb: float = 0.0
    """Its process's resident memory in MB."""
    cpu_count: int = 0
    """The CPUs its process may run on (0: unknown)."""
    models_loaded: int = 0
    """Models held loaded in its process's cache (whisper models, per model, device and compute type)."""
    machine: str = ""
    """The kernel its process runs on: its boot id, shared by the containers of one machine (empty:
    a worker that predates the field; its host stands for its machine)."""
    machine_cpus: int = 0
    """The CPUs of that machine, whatever its containers may use (0: unknown)."""
    cpu_quota: float = 0.0
    """The CPUs its cgroups' quota lets its process use (a container's `cpus:`; 0: no quota)."""


async def workers_bucket(js: JetStreamContext) -> KeyValue:
    """The heartbeat bucket, created on first use."""
    return await _key_value(
        js,
        js_api.KeyValueConfig(
            bucket=WORKERS_BUCKET, ttl=worker_ttl(), history=1, storage=js_api.StorageType.MEMORY
        ),
    )


async def existing_workers_bucket(js: JetStreamContext) -> KeyValue | None:
    """The heartbeat bucket if a worker has created it (None before any has), bound as it is: its
    TTL is the workers' setting, so a reader (the API) must not create it with its own."""
    try:
        return await js.key_value(WORKERS_BUCKET)
    except BucketNotFoundError:
        return None


async def callbacks_bucket(js: JetStreamContext) -> KeyValue:
    """The webhook-claim bucket, created on first use."""
    return await _key_value(
        js, js_api.KeyValueConfig(bucket=CALLBACKS_BUCKET, ttl=CALLBACK_CLAIM_TTL_S, history=1)
    )


SPEEDS_BUCKET = "JOBCAST_SPEEDS"
"""KV bucket of learned speeds (streams.Speed), one small value per streams.speed_key: workers
create it and write it when a job completes; the API only reads it."""
SPEEDS_MAX_BYTES = 1 << 20
"""Bound of the speeds bucket: thousands of keys at history 1; each value is under 200 bytes."""


async def speeds_bucket(js: JetStreamContext) -> KeyValue:
    """The learned-speeds bucket, created on first use (history 1: a key holds its average)."""
    return await _key_value(
        js,
        js_api.KeyValueConfig(
            bucket=SPEEDS_BUCKET, history=1, max_bytes=SPEEDS_MAX_BYTES, storage=js_api.StorageType.FILE
        ),
    )


async def existing_speeds_bucket(js: JetStreamContext) -> KeyValue | None:
    """The speeds bucket if a worker has created it (None before any has): the API only reads it."""
    try:
        return await js.key_value(SPEEDS_BUCKET)
    except BucketNotFoundError:
        return None


KEYS_BUCKET = "JOBCAST_KEYS"
"""KV bucket of API keys, one entry per key name; only the key's sha256 is stored."""


class ApiKeyRecord(msgspec.Struct, kw_only=True):
    """An API key as stored: its owner name, role and hash, never the key itself."""

    name: str
    sha256: str
    admin: bool = False
    created_at: float = 0.0


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine: only then may it run without keys."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def keys_bucket(js: JetStreamContext) -> KeyValue:
    """The API keys bucket, created on first use (history 1: a revoked key is deleted)."""
    return await _key_value(js, js_api.KeyValueConfig(bucket=KEYS_BUCKET, history=1))


ADMIN_KEY_NAME = "admin"
"""The key record that JOBCAST_ADMIN_KEY (or JOBCAST_ADMIN_KEY_FILE) provisions at API start-up."""


def admin_key_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The admin key an operator configured: JOBCAST_ADMIN_KEY, else the file JOBCAST_ADMIN_KEY_FILE names.

    None when neither is set (or both are empty). Surrounding whitespace is dropped, so a file
    written by `echo` or a Docker/Kubernetes secret works as it is.

    Raises:
        ValueError: JOBCAST_ADMIN_KEY_FILE is set but names no readable file, or an empty one; a
            deployment that meant to have an admin key must not start without one.
    """
    if value := environ.get("JOBCAST_ADMIN_KEY", "").strip():
        return value
    path = environ.get("JOBCAST_ADMIN_KEY_FILE", "").strip()
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"JOBCAST_ADMIN_KEY_FILE={path}: cannot read it ({exc})") from exc
    if not value:
        raise ValueError(f"JOBCAST_ADMIN_KEY_FILE={path}: the file is empty")
    return value


FILES_BUCKET = "JOBCAST_FILES"
"""Object store bucket of every file's bytes, by file id: a worker on another machine reads
inputs and writes outputs here, no shared disk needed."""


async def files_store(js: JetStreamContext) -> ObjectStore:
    """The files bucket, created on first use."""
    return await _object_store(js, FILES_BUCKET, "jobcast files")


CACHE_BUCKET = "JOBCAST_CACHE"
"""KV bucket of the stage cache: one manifest (streams.CacheEntry) per key (streams.cache_key)."""
CACHE_FILES_BUCKET = "JOBCAST_CACHE_FILES"
"""Object store bucket of the stage cache's output copies. Its own, not the files bucket: a job
served from the cache gets copies of its own, so deleting a job or a file never touches what the
cache holds, and evicting an entry never touches a job's files."""


async def cache_bucket(js: JetStreamContext) -> KeyValue:
    """The stage cache's manifests, created on first use (history 1: a hit rewrites `last_used`)."""
    return await _key_value(
        js, js_api.KeyValueConfig(bucket=CACHE_BUCKET, history=1, storage=js_api.StorageType.FILE)
    )


async def cache_files_store(js: JetStreamContext) -> ObjectStore:
    """The stage cache's output copies, created on first use."""
    return await _object_store(js, CACHE_FILES_BUCKET, "jobcast stage cache outputs")


async def drop_cache_marker(js: JetStreamContext, key: str) -> None:
    """Remove the marker a deleted manifest leaves (history 1 keeps one per key for good, and every
    scan of the bucket reads it), unless the key holds a value again: only messages up to the
    marker go. The subject and stream are the KV bucket's as NATS lays them out (ADR-8)."""
    stream, subject = f"KV_{CACHE_BUCKET}", f"$KV.{CACHE_BUCKET}.{key}"
    try:
        last = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return
    if (last.headers or {}).get("KV-Operation") in ("DEL", "PURGE") and last.seq is not None:
        await js.purge_stream(stream, subject=subject, seq=last.seq + 1)


async def drop_cache_copy_meta(js: JetStreamContext, name: str) -> None:
    """Remove the record a deleted copy leaves in the object store (its chunks are gone already;
    names are never reused, so the record only grows every later listing). Subject layout: ADR-20."""
    encoded = base64.urlsafe_b64encode(name.encode()).decode()
    await js.purge_stream(f"OBJ_{CACHE_FILES_BUCKET}", subject=f"$O.{CACHE_FILES_BUCKET}.M.{encoded}")


async def _object_store(js: JetStreamContext, bucket: str, description: str) -> ObjectStore:
    """An object store with JOBCAST_STREAM_REPLICAS replicas (see `_replicated`)."""

    async def create(replicas: int) -> ObjectStore:
        config = js_api.ObjectStoreConfig(
            description=description, storage=js_api.StorageType.FILE, replicas=replicas
        )
        return await js.create_object_store(bucket, config=config)

    async def held() -> js_api.StreamInfo:
        return (await (await js.object_store(bucket)).status()).stream_info

    return await _replicated(js, f"object store {bucket}", create, held)


async def _key_value(js: JetStreamContext, config: js_api.KeyValueConfig) -> KeyValue:
    """A KV bucket with JOBCAST_STREAM_REPLICAS replicas (see `_replicated`)."""

    async def create(replicas: int) -> KeyValue:
        return await js.create_key_value(config=replace(config, replicas=replicas))

    async def held() -> js_api.StreamInfo:
        return (await (await js.key_value(config.bucket)).status()).stream_info

    return await _replicated(js, f"KV bucket {config.bucket}", create, held)


async def _replicated(
    js: JetStreamContext,
    what: str,
    create: Callable[[int], Awaitable[T]],
    held: Callable[[], Awaitable[js_api.StreamInfo]],
) -> T:
    """A bucket created with JOBCAST_STREAM_REPLICAS replicas, or the existing one with its replicas
    raised to them; never lowered, so a process started without the setting binds to it as it is."""
    replicas = stream_replicas()
    try:
        return await create(replicas)
    except APIError as exc:
        refuse_placement(exc, what, replicas)
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    # It exists with other replicas (or differs in more, which this create still refuses).
    info = await held()
    bucket = await create(info.config.num_replicas or 1)
    await raise_replicas(js, info, replicas, what)
    return bucket
