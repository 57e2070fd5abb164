"""The stage cache on the worker's side: a job of a cacheable operation is looked up before its
handler runs, and its outputs are stored after it succeeds (streams/_cache.py has the key).

A hit copies the cached outputs into files of the job's own (new file ids, the same bytes and
names), so jobs never share an object: deleting a job or a file never touches the cache, and
evicting an entry never touches a job's files. The manifest is written last, after its copies,
so a reader never finds an entry whose bytes are not all there; an entry evicted under a reader
is a miss, and a manifest found incomplete is deleted (if unchanged since it was read) so the next
run stores afresh. Copies left by a worker that died mid-store are swept once they are an hour old.

Eviction runs when the buckets' bytes pass the bound, and evicts down to LOW_WATER of it, so one
scan of the manifests makes room for many stores. Deleted manifests and copies leave no markers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from streams import (
    OPERATIONS,
    CachedOutput,
    CacheEntry,
    EntryUsage,
    Submitted,
    cache_key,
    decode_entry,
    decode_usage,
    drop_cache_copy_meta,
    drop_cache_marker,
    encode_entry,
    file_url,
    object_digest_hex,
    safe_name,
)
from workers._context import Handler, JobContext
from workers._settings import WorkerSettings

log = logging.getLogger("jobcast.worker")

Identity = Callable[[dict[str, Any], WorkerSettings], dict[str, Any] | None]
"""What decides an operation's outputs besides its input and params, from its params and the
worker's settings (blocking: it may look at files); None when that cannot be known yet, and the
job is not cached."""

MANIFEST_BYTES = 1024
"""About what a manifest takes besides its result: counted against the bound with its outputs."""
LOW_WATER = 0.9
"""Eviction frees room down to this share of the bound: the next stores need no scan."""
ORPHAN_AGE_S = 3600.0
"""Copies no manifest names are swept once this old: a store in progress is younger."""
CACHE_ERRORS = (nats.errors.Error, TimeoutError, OSError, msgspec.MsgspecError)
"""What a cache lookup or store may fail with: the job then runs, or ends, as without a cache."""


@dataclass(frozen=True, slots=True)
class Keyed:
    """A job's cache key and the name its input had."""

    key: str
    input_sha256: str
    input_stem: str


class StageCache:
    """Answers jobs from the cache bucket and its object store, and stores what they produce."""

    def __init__(
        self,
        js: JetStreamContext,
        manifests: KeyValue,
        copies: ObjectStore,
        max_bytes: int,
        identities: dict[str, Identity],
    ) -> None:
        self.js = js
        self.manifests = manifests
        self.copies = copies
        self.max_bytes = max_bytes
        """The bound of the cache buckets' bytes (JOBCAST_CACHE_MAX_BYTES); 0: no lookups, no stores."""
        self.identities = identities
        self.scans = 0
        """How many times a store has read every manifest to choose what to evict."""

    def around(self, job: Submitted, handler: Handler) -> Handler:
        """`handler` with a lookup before it and a store after it, for a job of a cacheable operation."""
        spec = OPERATIONS.get(job.type)
        identity = self.identities.get(job.type)
        if spec is None or not spec.cacheable or identity is None or job.file_id is None:
            return handler
        enabled = job.cache and self.max_bytes > 0

        async def cached(ctx: JobContext) -> dict[str, Any] | None:
            keyed = await self._key(ctx, identity, spec.cache_excluded) if enabled else None
            if keyed is not None and (result := await self._replay(ctx, keyed)) is not None:
                return result
            result = await handler(ctx)
            if result is None:
                return None
            if enabled:
                # A hub model's identity is known once it is downloaded, which the run just did.
                keyed = keyed or await self._key(ctx, identity, spec.cache_excluded)
                if keyed is not None:
                    await self._store(ctx, keyed, result)
            return {**result, "cached": False}

        return cached

    async def _key(self, ctx: JobContext, identity: Identity, excluded: frozenset[str]) -> Keyed | None:
        """The job's key; None when its input or its model cannot be pinned down (it runs uncached)."""
        job = ctx.job
        assert job.file_id is not None
        assert ctx.files is not None
        try:
            info = await ctx.files.store.get_info(job.file_id)
            decided_by = await asyncio.to_thread(identity, job.params, ctx.settings)
            code = version("jobcast")
        except CACHE_ERRORS:
            return None  # the handler says what is wrong with the input
        except PackageNotFoundError:  # run from a source tree: no version pins the code that runs
            return None
        input_sha256 = object_digest_hex(info.digest)
        if input_sha256 is None or decided_by is None:
            return None
        name = Path(safe_name(info.description or "", default=job.file_id))
        key = cache_key(
            job.type, input_sha256, job.params, input_suffix=name.suffix, excluded=excluded,
            identity={**decided_by, "jobcast": code},
        )  # fmt: skip
        return Keyed(key=key, input_sha256=input_sha256, input_stem=name.stem)

    async def _replay(self, ctx: JobContext, keyed: Keyed) -> dict[str, Any] | None:
        """The cached result with copies of its outputs as the job's own; None on a miss."""
        try:
            found = await self.manifests.get(keyed.key)
            entry = decode_entry(found.value or b"")
        except js_errors.KeyNotFoundError:
            return None
        except CACHE_ERRORS as exc:
            log.warning("stage cache: lookup of %s failed (%s); running the job", keyed.key, exc)
            return None
        revision = found.revision or 0
        ctx.progress(0.0, "copying the outputs from the cache")
        # Every copy is fetched before any is saved: a copy evicted meanwhile makes a miss that
        # leaves the job no stray files.
        fetched: list[tuple[CachedOutput, Path]] = []
        for index, output in enumerate(entry.outputs):
            path = ctx.workdir / f"cached-{index}"
            try:
                with path.open("wb") as handle:
                    got = await self.copies.get(output.object_name, writeinto=handle)
            except CACHE_ERRORS as exc:
                log.info("stage cache: %s is incomplete (%s); running the job", keyed.key, exc)
                if isinstance(exc, js_errors.NotFoundError):  # evicted under us, or broken for good
                    await self._drop(keyed.key, revision, [o.object_name for o in entry.outputs])
                return None
            if object_digest_hex(got.info.digest) != output.sha256:
                log.warning(
                    "stage cache: a copy of %s does not match its manifest; running the job", keyed.key
                )
                await self._drop(keyed.key, revision, [o.object_name for o in entry.outputs])
                return None
            fetched.append((output, path))
        saved: dict[str, dict[str, Any]] = {}
        for output, path in fetched:
            name = output.name
            if entry.input_stem and name.startswith(f"{entry.input_stem}."):
                name = keyed.input_stem + name[len(entry.input_stem) :]
            saved[output.file_id] = await ctx.save_output(path, name, output.content_type)
        entry.last_used = time.time()
        # Only the manifest read is touched: one evicted or replaced meanwhile must not come back
        # naming copies that are gone. A lost touch only makes it look older.
        with contextlib.suppress(*CACHE_ERRORS):
            await self.manifests.update(keyed.key, encode_entry(entry), last=revision)
        ctx.progress(100.0, "served from the cache")
        log.info(
            "job %s served from the cache (%s)", ctx.job.job_id, keyed.key, extra={"job_id": ctx.job.job_id}
        )
        result = _renamed(entry.result or {}, saved)
        return {**result, "cached": True}

    async def _store(self, ctx: JobContext, keyed: Keyed, result: dict[str, Any]) -> None:
        """Keep copies of the job's outputs and the manifest that names them; a failure only logs."""
        # An entry counts its manifest too: an operation without output files still takes room.
        size = sum(int(entry["size"]) for _, entry in ctx.saved) + len(msgspec.json.encode(result))
        size += MANIFEST_BYTES
        if size > self.max_bytes:
            log.info(
                "stage cache: an entry of %d bytes exceeds its %d-byte bound; not kept", size, self.max_bytes
            )
            return
        prefix = f"{keyed.key}/{int(time.time())}-{uuid.uuid4().hex[:12]}"
        outputs: list[CachedOutput] = []
        try:
            await self._make_room(size)
            for index, (path, entry) in enumerate(ctx.saved):
                outputs.append(await self._copy_in(ctx, f"{prefix}/{index}", path, entry))
            now = time.time()
            manifest = CacheEntry(
                operation=ctx.job.type, input_sha256=keyed.input_sha256, input_stem=keyed.input_stem,
                result=result, outputs=outputs, size=size, job_id=ctx.job.job_id, stored_at=now, last_used=now,
            )  # fmt: skip
            await self.manifests.create(keyed.key, encode_entry(manifest))
        except js_errors.KeyWrongLastSequenceError:
            # another run stored this key first: keep that one
            await self._delete_copies([o.object_name for o in outputs])
        except (*CACHE_ERRORS, _CopyMismatchError) as exc:
            log.warning("stage cache: storing job %s failed (%s); it is not cached", ctx.job.job_id, exc)
            await self._delete_copies([o.object_name for o in outputs])

    async def _copy_in(self, ctx: JobContext, name: str, path: Path, entry: dict[str, Any]) -> CachedOutput:
        """One output copied into the cache's store, from the local file it was saved from."""
        if not await asyncio.to_thread(path.is_file):  # a handler that removed its file: take the stored one
            path = ctx.workdir / f"cache-copy-{entry['file_id']}"
            assert ctx.files is not None
            with path.open("wb") as handle:
                await ctx.files.store.get(entry["file_id"], writeinto=handle)
        with path.open("rb") as handle:
            info = await self.copies.put(name, handle)
        output = CachedOutput(
            object_name=name, file_id=entry["file_id"], name=entry["name"],
            content_type=entry["content_type"], size=int(entry["size"]), sha256=entry["sha256"],
        )  # fmt: skip
        if object_digest_hex(info.digest) != output.sha256:
            await self._delete_copies([name])
            raise _CopyMismatchError(f"{path.name} changed after it was saved")
        return output

    async def _make_room(self, incoming: int) -> None:
        """Past the bound, evict the least recently used entries until `incoming` more bytes fit
        under LOW_WATER of it."""
        # One measure, the buckets' bytes (framing, markers and orphans included): cheap to read,
        # and below the bound nothing needs counting.
        copies, manifests = await self.copies.status(), await self.manifests.status()
        held: float = copies.size + manifests.stream_info.state.bytes
        if held + incoming <= self.max_bytes:
            return
        self.scans += 1
        entries = await self._entries()
        total = sum(usage.size for _, _, usage in entries)
        # An entry's share of the buckets' bytes: its size scaled by what they hold per byte counted.
        scale = held / total if total else 1.0
        target = self.max_bytes * LOW_WATER
        for key, revision, usage in sorted(entries, key=lambda item: item[2].last_used):
            if held + incoming <= target:
                break
            if await self._drop(key, revision, [o.object_name for o in usage.outputs]):
                held -= usage.size * scale
                log.info("stage cache: evicted %s (%d bytes, least recently used)", key, usage.size)
        await self._sweep({o.object_name for _, _, usage in entries for o in usage.outputs})

    async def _entries(self) -> list[tuple[str, int, EntryUsage]]:
        """Every manifest in the bucket: its key, revision, and what eviction needs of it."""
        found: list[tuple[str, int, EntryUsage]] = []
        watcher = await self.manifests.watchall(ignore_deletes=True)
        try:
            async for item in watcher:
                if item is None:  # the bucket's current values are all in
                    break
                with contextlib.suppress(msgspec.MsgspecError):
                    found.append((item.key, item.revision or 0, decode_usage(item.value or b"")))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
        return found

    async def _drop(self, key: str, revision: int, names: list[str]) -> bool:
        """Delete a manifest, if it is still at `revision`, and then its copies; whether it went."""
        try:
            await self.manifests.delete(key, last=revision)
        except js_errors.APIError:  # touched or replaced since it was read: it stays
            return False
        except CACHE_ERRORS as exc:
            log.warning("stage cache: deleting %s failed (%s)", key, exc)
            return False
        with contextlib.suppress(*CACHE_ERRORS):
            await drop_cache_marker(self.js, key)
        await self._delete_copies(names)
        return True

    async def _sweep(self, named: set[str]) -> None:
        """Delete copies that no manifest names and that are older than any store in progress."""
        try:
            listed = await self.copies.list(ignore_deletes=True)
        except js_errors.NotFoundError:
            return
        cutoff = time.time() - ORPHAN_AGE_S
        orphans = []
        for info in listed:
            stamp = info.name.split("/")[1].split("-")[0] if info.name.count("/") == 2 else ""
            if info.name not in named and stamp.isdigit() and int(stamp) < cutoff:
                orphans.append(info.name)
        await self._delete_copies(orphans)

    async def _delete_copies(self, names: list[str]) -> None:
        """Delete copies, with the record each would leave behind."""
        for name in names:
            with contextlib.suppress(*CACHE_ERRORS):
                await self.copies.delete(name)
            with contextlib.suppress(*CACHE_ERRORS):  # also the record of a copy deleted before
                await drop_cache_copy_meta(self.js, name)


class _CopyMismatchError(Exception):
    """An output's copy does not have the bytes the job saved."""


def _renamed(value: Any, saved: dict[str, dict[str, Any]]) -> Any:
    """A cached result with the served job's files in place of the run's: each output entry
    replaced by the new file's, and each mention of an old file id or url by the new one."""
    if isinstance(value, dict):
        if isinstance(file_id := value.get("file_id"), str) and file_id in saved:
            return {**value, **saved[file_id]}
        return {name: _renamed(item, saved) for name, item in value.items()}
    if isinstance(value, list):
        return [_renamed(item, saved) for item in value]
    if isinstance(value, str):
        for old, new in saved.items():
            if value == old:
                return new["file_id"]
            if value == file_url(old):
                return new["url"]
    return value
