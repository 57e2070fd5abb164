"""The stage cache's contract: how a job's outputs are keyed, and the manifest each key holds.

A job of a cacheable operation is keyed on the sha256 of its input's bytes (and the input's
extension, which a media probe may weigh), the operation, every param except those its spec
declares irrelevant to the output, and what else decides the output (the model's identity, the
library and jobcast versions: `identity`). The manifest, in the CACHE_BUCKET KV bucket, names
the output copies in the CACHE_FILES_BUCKET object store and the result to answer with; its
`last_used` orders eviction (least recently used first) once the cache passes its byte bound.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

import msgspec

from streams._env import env_int

CACHE_KEY_VERSION = 2
"""Part of every key: raised when the key's material changes meaning, or when the same material
now gives other outputs, so old entries miss (2: generate_srt and transcribe run the quality gate
by default)."""
CACHE_MAX_BYTES = 2 << 30
"""Default bound of the cache buckets' bytes (2 GiB); JOBCAST_CACHE_MAX_BYTES overrides it."""


def cache_max_bytes() -> int:
    """JOBCAST_CACHE_MAX_BYTES, the bound of the cache buckets' bytes; 0 turns the cache off."""
    bound = env_int("JOBCAST_CACHE_MAX_BYTES", CACHE_MAX_BYTES)
    if bound < 0:
        raise ValueError(f"JOBCAST_CACHE_MAX_BYTES={bound}: give a byte count, 0 to turn the cache off")
    return bound


class CachedOutput(msgspec.Struct, kw_only=True):
    """One output file of a cached run: its copy in the cache's object store and its metadata."""

    object_name: str
    """The copy's name in the cache's object store."""
    file_id: str
    """The file id it had in the run that stored it; the cached result names it."""
    name: str
    content_type: str
    size: int
    sha256: str


class CacheEntry(msgspec.Struct, kw_only=True):
    """The value of a key in the cache bucket: what a hit answers with."""

    operation: str
    input_sha256: str
    input_stem: str
    """The input's name without its extension in the run that stored it: output names that start
    with it are renamed after the input of the job served."""
    result: dict[str, Any] | None
    outputs: list[CachedOutput]
    size: int
    """About what it adds to the buckets' bytes (its outputs', its result's, about a manifest's):
    a store makes room for it, and eviction scales it by what the buckets hold per byte counted."""
    job_id: str
    """The job whose run it is."""
    stored_at: float
    last_used: float
    """Unix time of its last hit (or its store): the least recently used is evicted first."""


class CopyName(msgspec.Struct):
    """An output copy's name, all eviction needs of a CachedOutput."""

    object_name: str


class EntryUsage(msgspec.Struct):
    """What eviction reads of a manifest: the rest (its result) is skipped, not decoded."""

    size: int
    last_used: float
    outputs: list[CopyName]


_manifest_decoder = msgspec.json.Decoder(CacheEntry)
_usage_decoder = msgspec.json.Decoder(EntryUsage)


def encode_entry(entry: CacheEntry) -> bytes:
    """A manifest as stored."""
    return msgspec.json.encode(entry)


def decode_entry(data: bytes) -> CacheEntry:
    """A stored manifest; raises msgspec.DecodeError / ValidationError on a foreign value."""
    return _manifest_decoder.decode(data)


def decode_usage(data: bytes) -> EntryUsage:
    """A stored manifest's size, last use and copies; raises as `decode_entry` does."""
    return _usage_decoder.decode(data)


def cache_key(
    operation: str,
    input_sha256: str,
    params: Mapping[str, Any],
    *,
    input_suffix: str = "",
    excluded: frozenset[str] = frozenset(),
    identity: Mapping[str, Any] | None = None,
) -> str:
    """The key of a job's outputs: a sha256 in hex over everything that decides them."""
    material = {
        "version": CACHE_KEY_VERSION,
        "operation": operation,
        "input_sha256": input_sha256,
        "input_suffix": input_suffix,
        "params": {name: value for name, value in params.items() if name not in excluded},
        "identity": dict(identity or {}),
    }
    return hashlib.sha256(msgspec.json.encode(material, order="sorted")).hexdigest()


def object_digest_hex(digest: str | None) -> str | None:
    """The sha256 in hex of an object store digest (`SHA-256=<base64url>`); None for another kind.

    nats-py checks an object's bytes against this digest on every read, so it stands for them.
    """
    if not digest or not digest.upper().startswith("SHA-256="):
        return None
    try:
        raw = base64.urlsafe_b64decode(digest.split("=", 1)[1] + "==")
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None
