"""Stream and consumer configuration, as data.

Every process calls `ensure_stream`; the definitions below are the only source of
truth for how JetStream keeps jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from streams._errors import ReplicasError
from streams._limits import MAX_DELIVER
from streams._subjects import ALL_SUBJECTS, STREAM, pool_submissions, priority_token
from streams._supervisor import TaskState

log = logging.getLogger("jobcast.streams")
T = TypeVar("T")


class Pool(enum.StrEnum):
    """Worker pools: each has its own durable consumer."""

    GPU = "gpu"
    CPU = "cpu"
    LLM = "llm"


STREAM_MAX_BYTES = 10 * 2**30
"""Default size limit of the JOBS stream, 10 GiB (JOBCAST_STREAM_MAX_BYTES; 0: no limit). Retention
(JOBCAST_RETENTION_DAYS) keeps the stream well below it; see ADMISSION_SHARE for what happens
near it."""
ADMISSION_SHARE = 0.9
"""New work (submissions, retries, uploads) is refused with 503 "storage full" once the stream
holds this share of its max_bytes; the rest is room for the events of the jobs already accepted,
so that they can finish and the limit itself is never reached."""
DUPLICATE_WINDOW_S = 120.0
"""Default duplicate window (JOBCAST_DUPLICATE_WINDOW_S)."""

JOBS_STREAM = js_api.StreamConfig(
    name=STREAM,
    description="jobcast: job submissions, lifecycle events and control messages",
    subjects=[ALL_SUBJECTS],
    # Limits retention: the stream is the log the API's SQLite projection is rebuilt
    # from, so messages stay after workers ack them, until the job is deleted (its subjects
    # are purged then) or retention deletes it.
    retention=js_api.RetentionPolicy.LIMITS,
    storage=js_api.StorageType.FILE,
    # A re-sent publish with the same Nats-Msg-Id inside this window is dropped by the
    # server: this is what makes an API retry after a lost PubAck harmless.
    duplicate_window=DUPLICATE_WINDOW_S,
    # Direct gets let workers read the last control/event message of a job cheaply.
    allow_direct=True,
    # `scheduled_for`: the stream itself holds a scheduled submission (jobs.schedule.<id>)
    # and publishes it to its jobs.submit subject when it is due (nats-server >= 2.12).
    allow_msg_schedules=True,
    # A deleted job's tombstone (jobs.deleted.<id>) expires by itself (header Nats-TTL).
    allow_msg_ttl=True,
    max_bytes=STREAM_MAX_BYTES,
    # At max_bytes the server drops the oldest messages (DiscardOld); nats-server does not allow
    # DiscardNew, which would refuse new ones instead, on a stream with message schedules. The
    # API therefore stops taking new work well before the limit (ADMISSION_SHARE), so that
    # nothing accepted is ever dropped.
    discard=js_api.DiscardPolicy.OLD,
)


MAX_REPLICAS = 5
"""JetStream keeps at most five copies of a stream."""


def stream_replicas() -> int:
    """JOBCAST_STREAM_REPLICAS (default 1): how many cluster nodes keep a copy of the JOBS stream, every
    KV bucket and the files store; 3 on a cluster, so that losing one node loses nothing.

    Raises:
        ValueError: not a whole number from 1 to MAX_REPLICAS.
    """
    text = os.environ.get("JOBCAST_STREAM_REPLICAS", "").strip() or "1"
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise ValueError(f"JOBCAST_STREAM_REPLICAS={text!r}: a whole number from 1 to {MAX_REPLICAS}")
    return int(text)


def jobs_stream() -> js_api.StreamConfig:
    """JOBS_STREAM with the settings in force: JOBCAST_STREAM_MAX_BYTES, JOBCAST_DUPLICATE_WINDOW_S and
    JOBCAST_STREAM_REPLICAS (the API brings the stream in line with them as it starts; workers only
    create it if missing)."""
    max_bytes = int(os.environ.get("JOBCAST_STREAM_MAX_BYTES") or STREAM_MAX_BYTES)
    window = float(os.environ.get("JOBCAST_DUPLICATE_WINDOW_S") or DUPLICATE_WINDOW_S)
    return replace(
        JOBS_STREAM, max_bytes=max_bytes if max_bytes > 0 else -1, duplicate_window=window,
        num_replicas=stream_replicas(),
    )  # fmt: skip


INSUFFICIENT_STORAGE = 10047
"""JetStream's error code when the server cannot reserve a stream's max_bytes in its store."""


WORKERS_BUCKET = "JOBCAST_WORKERS"
"""KV bucket of worker heartbeats, one key per worker (`<pool>.<name>`)."""
WORKER_TTL_S = 15.0
"""A worker that has not refreshed its key this long is gone; workers refresh every TTL/3.
JOBCAST_WORKER_TTL_S overrides it (every process of a deployment must agree)."""


def worker_ttl() -> float:
    """The heartbeat TTL in force."""
    return float(os.environ.get("JOBCAST_WORKER_TTL_S") or WORKER_TTL_S)


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


async def callbacks_bucket(js: JetStreamContext) -> KeyValue:
    """The webhook-claim bucket, created on first use."""
    return await _key_value(
        js, js_api.KeyValueConfig(bucket=CALLBACKS_BUCKET, ttl=CALLBACK_CLAIM_TTL_S, history=1)
    )


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

    async def create(replicas: int) -> ObjectStore:
        config = js_api.ObjectStoreConfig(
            description="jobcast files", storage=js_api.StorageType.FILE, replicas=replicas
        )
        return await js.create_object_store(FILES_BUCKET, config=config)

    async def held() -> js_api.StreamInfo:
        return (await (await js.object_store(FILES_BUCKET)).status()).stream_info

    return await _replicated(js, f"object store {FILES_BUCKET}", create, held)


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
        _refuse_placement(exc, what, replicas)
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    # It exists with other replicas (or differs in more, which this create still refuses).
    info = await held()
    bucket = await create(info.config.num_replicas or 1)
    await _raise_replicas(js, info, replicas, what)
    return bucket


STREAM_NAME_IN_USE = 10058
"""JetStream's error code for a create whose stream exists with another configuration."""
PLACEMENT_ERRORS = frozenset({10074, 10005})
"""Replicas the server cannot place: it is not clustered, or has too few suitable nodes."""


def _refuse_placement(exc: APIError, what: str, replicas: int) -> None:
    """Raise a ReplicasError that says what to do when `exc` is the server refusing the replicas."""
    if exc.err_code in PLACEMENT_ERRORS:
        raise ReplicasError(
            f"{what} cannot be created with {replicas} replicas ({exc.description}): JOBCAST_STREAM_REPLICAS="
            f"{replicas} needs a JetStream cluster of at least {replicas} nodes; on one nats-server leave it at 1"
        ) from exc


async def _raise_replicas(js: JetStreamContext, held: js_api.StreamInfo, replicas: int, what: str) -> None:
    """Raise an existing stream's replicas to `replicas`, or log why it cannot; never lowers them."""
    have = held.config.num_replicas or 1
    if have >= replicas:
        return
    name = held.config.name
    try:
        await js.update_stream(config=replace(held.config, num_replicas=replicas))
    except APIError as exc:
        log.error(
            "%s keeps %d replica(s), not the %d JOBCAST_STREAM_REPLICAS asks for: %s. Start enough JetStream "
            "nodes, then restart the API or run `nats stream edit %s --replicas %d`",
            what, have, replicas, exc.description, name, replicas,
        )  # fmt: skip
        return
    log.info("%s: replicas raised from %d to %d", what, have, replicas)
    await _settled(js, name or "", replicas)


SETTLE_TIMEOUT_S = 30.0
"""How long a stream whose replicas were just raised may take to elect its new leader and copy itself."""


async def _settled(js: JetStreamContext, name: str, replicas: int) -> None:
    """Return once stream `name` has a leader and `replicas - 1` current followers: until then its
    publishes time out (the new group elects its leader, then copies the stream to the new peers)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT_S
    while loop.time() < deadline:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            cluster = (await js.stream_info(name)).cluster
            peers = (cluster.replicas or []) if cluster is not None and cluster.leader else None
            if peers is not None and len(peers) >= replicas - 1 and all(peer.current for peer in peers):
                return
        await asyncio.sleep(0.1)
    log.warning("stream %s has not settled on %d replicas within %.0f s", name, replicas, SETTLE_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class WorkerConsumer:
    """The durable pull consumer a pool's workers share for one priority.

    One consumer per priority keeps each priority FIFO; workers ask the highest
    priority first, so a high-priority job never waits behind low-priority ones.
    """

    pool: str
    priority: int = 0
    ack_wait_s: float = 30.0
    """Unacked this long, a message is redelivered. Workers send in_progress() every
    ack_wait/3 while a job runs, so only a dead worker lets it expire."""
    max_deliver: int = MAX_DELIVER
    """Server-side backstop, one past the highest `max_attempts` (MAX_ATTEMPTS): the per-job
    limit is `max_attempts`, enforced by the worker, which fails a job whose deliveries exceed
    it (e.g. a job that kills its worker). Were it lower, a job still asking to retry would
    never be delivered again and stay `retrying` for ever."""
    max_ack_pending: int = 1000
    """Jobs handed out but not yet acked, across all workers of the pool."""

    @property
    def durable(self) -> str:
        """Durable name: worker processes of one pool share it and survive restarts."""
        return f"workers-{self.pool}-{priority_token(self.priority)}"

    def config(self) -> js_api.ConsumerConfig:
        """The ConsumerConfig for this pool."""
        # No BackOff: with one, the server ignores the delay of a nak (it redelivers at
        # BackOff[n] - AckWait + delay), so the worker's retry backoff would not hold and a job
        # asking for 50 attempts would take most of an hour. A dead worker's job comes back
        # after AckWait; a crash loop ends at the job's max_attempts (the worker's precheck).
        return js_api.ConsumerConfig(
            durable_name=self.durable,
            filter_subject=pool_submissions(self.pool, self.priority),
            ack_policy=js_api.AckPolicy.EXPLICIT,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            max_waiting=512,
        )


async def ensure_stream(js: JetStreamContext, *, update: bool = True) -> None:
    """Create the JOBS stream, or, with `update`, bring an existing one in line with `jobs_stream()`
    (its limits included: a changed JOBCAST_STREAM_MAX_BYTES applies at the API's next start).

    Workers pass update=False: a worker on another machine, started without the API's settings,
    must not move the stream's limits (a smaller byte limit would discard the oldest messages,
    live jobs' submissions among them, at once).
    """
    config = jobs_stream()
    try:
        await _add_or_update(js, config, update)
    except APIError as exc:
        if exc.err_code != INSUFFICIENT_STORAGE or os.environ.get("JOBCAST_STREAM_MAX_BYTES"):
            raise
        # The default limit is more than this server's JetStream store can reserve (a small
        # disk): no stream limit then; the server's own store limit refuses what does not fit.
        log.warning(
            "nats-server cannot reserve %d bytes for the JOBS stream (%s): it runs without a byte limit; "
            "set JOBCAST_STREAM_MAX_BYTES to what its store can hold",
            config.max_bytes, exc.description,
        )  # fmt: skip
        await _add_or_update(js, replace(config, max_bytes=-1), update)


async def _add_or_update(js: JetStreamContext, config: js_api.StreamConfig, update: bool) -> None:
    try:
        await js.add_stream(config=config)
    except APIError as exc:
        _refuse_placement(exc, f"the {STREAM} stream", config.num_replicas or 1)
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        if not update:  # it exists, with another configuration
            return
        held = await js.stream_info(STREAM)
        config = _kept_replicas(config, held)
        if config.max_bytes is not None and 0 < config.max_bytes <= (held.state.bytes or 0):
            # Lowering the limit below what the stream holds would discard messages at once.
            log.error(
                "JOBCAST_STREAM_MAX_BYTES=%d is not above the %d bytes the JOBS stream holds: its limit "
                "stays %s; delete jobs first, or raise the setting",
                config.max_bytes, held.state.bytes, held.config.max_bytes,
            )  # fmt: skip
            config = replace(config, max_bytes=held.config.max_bytes)
        try:
            await js.update_stream(config=config)
        except APIError as exc:
            if exc.err_code not in PLACEMENT_ERRORS or config.num_replicas == held.config.num_replicas:
                raise
            log.error(
                "the %s stream keeps %d replica(s), not the %d JOBCAST_STREAM_REPLICAS asks for: %s. Start "
                "enough JetStream nodes, then restart the API or run `nats stream edit %s --replicas %d`",
                STREAM, held.config.num_replicas, config.num_replicas, exc.description, STREAM, config.num_replicas,
            )  # fmt: skip
            await js.update_stream(config=replace(config, num_replicas=held.config.num_replicas))
        else:
            if (held.config.num_replicas or 1) < (config.num_replicas or 1):
                log.info(
                    "the %s stream: replicas raised from %d to %d",
                    STREAM, held.config.num_replicas, config.num_replicas,
                )  # fmt: skip
                await _settled(js, STREAM, config.num_replicas or 1)


def _kept_replicas(config: js_api.StreamConfig, held: js_api.StreamInfo) -> js_api.StreamConfig:
    """`config`, but never with fewer replicas than the stream has: losing copies takes a deliberate act."""
    have, wanted = held.config.num_replicas or 1, config.num_replicas or 1
    if wanted >= have:
        return config
    log.warning(
        "JOBCAST_STREAM_REPLICAS=%d is below the %d replicas of the %s stream: it keeps %d; to lower them on "
        "purpose run `nats stream edit %s --replicas %d`",
        wanted, have, STREAM, have, STREAM, wanted,
    )  # fmt: skip
    return replace(config, num_replicas=have)


async def ensure_consumer(js: JetStreamContext, consumer: WorkerConsumer) -> None:
    """Create a pool's durable consumer; the server updates an existing one in place."""
    # Never delete and recreate: a fresh consumer would redeliver every job ever run.
    await js.add_consumer(STREAM, config=consumer.config())
