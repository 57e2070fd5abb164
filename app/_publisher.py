"""The API's writes to the job log: each event published where it belongs, admission while the
stream has room, and read-your-writes (waiting until the projection has applied a write)."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from app._db import Database
from app._exceptions import StorageFullError, UnavailableError, queue_unavailable
from app._hub import Hub
from app._projection import Handoff, Projection
from app._settings import Settings
from streams import (
    ADMISSION_SHARE,
    JOB_HEADER,
    KIND_HEADER,
    PARENT_POOLS,
    STREAM,
    CancelRequested,
    Deleted,
    Event,
    FileDeleted,
    FileStored,
    Submitted,
    control_subject,
    deleted_subject,
    encode_event,
    events_subject,
    files_subject,
    schedule_subject,
    submit_subject,
    utcnow,
)

WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check."""
STORE_FULL = frozenset({10077, 10023})
"""JetStream's error codes for a refused store (stream at its limit) and for insufficient resources."""


class TombstonedError(Exception):
    """The submission's job id has a tombstone: a job of that id was deleted."""


class Publisher:
    """Publishes jobs' and files' events to JetStream and waits for the projection to apply them."""

    def __init__(
        self, settings: Settings, db: Database, js: JetStreamContext, projection: Projection, hub: Hub
    ) -> None:
        self.settings = settings
        self.db = db
        self.js = js
        self.projection = projection
        self.hub = hub
        self._storage: tuple[float, int, int] = (float("-inf"), 0, -1)
        """When the stream's size was last read, its bytes and its max_bytes (-1: no limit)."""

    async def check_storage(self) -> None:
        """StorageFullError (503) while the stream holds ADMISSION_SHARE of its max_bytes: new work
        waits until retention or deletes make room, so jobs already accepted can always finish."""
        checked_at, used, limit = self._storage
        now = asyncio.get_running_loop().time()
        # Past half of the threshold every submission looks again, so that a burst cannot run
        # through the room left for the jobs already accepted on one stale look.
        stale = now - checked_at >= self.settings.storage_check_s
        if stale or (limit > 0 and used >= limit * ADMISSION_SHARE / 2):
            self._storage = (now, used, limit)  # one look per interval, however many submit at once
            try:
                info = await self.js.stream_info(STREAM)
            except (nats.errors.Error, TimeoutError) as exc:
                raise queue_unavailable(exc) from exc
            used, limit = info.state.bytes, info.config.max_bytes or -1
            self._storage = (now, used, limit)
        if limit > 0 and used >= limit * ADMISSION_SHARE:
            raise StorageFullError(
                f"storage full: the job log holds {used} of its {limit} bytes and takes no new jobs past "
                f"{ADMISSION_SHARE:.0%}; delete finished jobs (or raise JOBCAST_STREAM_MAX_BYTES) and try again"
            )

    async def publish(self, event: Event, msg_id: str | None = None, fresh: bool = False) -> PubAck:
        """Publish an event where it belongs: submissions to their pool (or, when scheduled,
        to the stream's scheduler; a parent's or a waiting stage's to its events subject), tombstones to jobs.deleted, everything else to the job's
        events or control subject. `fresh`: refuse a submission whose job id has a tombstone
        (raises TombstonedError; checked by the server, atomically with the publish)."""
        headers: dict[str, str] = {KIND_HEADER: event.kind, JOB_HEADER: event.job_id}
        if isinstance(event, Submitted):
            headers["Nats-Msg-Id"] = msg_id or f"{event.job_id}:{event.attempt}"
            if fresh:
                headers["Nats-Expected-Last-Subject-Sequence"] = "0"
                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = deleted_subject(event.job_id)
            if event.pool in PARENT_POOLS or event.waiting:
                subject = events_subject(event.job_id)  # recorded, queued for no worker
                if event.waiting:
                    headers["Nats-Msg-Id"] += ":waiting"  # its submission proper is `<id>:<attempt>`
            else:
                subject = submit_subject(event.pool, event.priority, event.job_id)
            if event.scheduled_for is not None and event.scheduled_for > utcnow():
                headers["Nats-Msg-Id"] += ":scheduled"
                headers["Nats-Schedule"] = f"@at {event.scheduled_for:%Y-%m-%dT%H:%M:%S.%fZ}"
                headers["Nats-Schedule-Target"] = subject
                subject = schedule_subject(event.job_id)
        else:
            if isinstance(event, FileStored | FileDeleted):
                subject = files_subject(event.file_id)
            elif isinstance(event, CancelRequested):
                subject = control_subject(event.job_id)
            elif isinstance(event, Deleted):
                subject = deleted_subject(event.job_id)
            else:
                subject = events_subject(event.job_id)
            if isinstance(event, Deleted | FileDeleted) and self.settings.tombstone_ttl_s > 0:
                headers["Nats-TTL"] = f"{max(1, round(self.settings.tombstone_ttl_s))}s"
            if msg_id:
                headers["Nats-Msg-Id"] = msg_id
        try:
            return await self.js.publish(subject, encode_event(event), headers=headers, timeout=5)
        except nats.js.errors.APIError as exc:
            if fresh and exc.err_code == WRONG_LAST_SEQUENCE:
                raise TombstonedError(event.job_id) from None
            if exc.err_code in STORE_FULL:
                raise StorageFullError(
                    f"storage full: the job log refuses new messages ({exc.description}); finished jobs "
                    "must be deleted, or JOBCAST_STREAM_MAX_BYTES raised, before it accepts more"
                ) from exc
            raise UnavailableError(f"the job queue is unavailable ({exc.description}); try again") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise queue_unavailable(exc) from exc

    async def wait_applied(self, seq: int, ident: str) -> None:
        """Read-your-writes for other resources (files)."""
        await self.applied(seq, ident)

    async def applied(self, seq: int, job_id: str) -> Handoff | None:
        """Read-your-writes: wait until the projection has applied `seq`; returns the job as that
        batch left it when the batch touched it (see `Projection.wait_for`)."""
        try:
            return await self.projection.wait_for(seq, self.settings.submit_timeout_s, job_id)
        except TimeoutError:
            raise UnavailableError(
                f"job {job_id} was accepted but is not visible yet; poll GET /api/v1/jobs/{job_id}"
            ) from None
