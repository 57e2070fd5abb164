"""Job queries and commands behind the controllers: read the projection, publish to the stream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck
from sqlalchemy import Connection, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app._db import JOBS, Database, EventRow, FileRow, JobRow
from app._exceptions import (
    ConflictError,
    NotFoundError,
    StorageFullError,
    TooManyError,
    TooSlowError,
    UnavailableError,
    not_found,
    queue_unavailable,
)
from app._hub import Applied, Hub
from app._projection import Handoff, Projection
from app._queue import BATCH_POOL, page_positions, queue_position
from app._schemas import (
    BatchItem,
    EventEnvelope,
    Job,
    JobPage,
    JobStatusView,
    QueuePosition,
    StatusUpdate,
    SubmitBatch,
    SubmitJob,
)
from app._settings import Settings
from app._sse import HISTORY_PAGE, SseFanout
from streams import (
    ACTIVE_STATUSES,
    ADMISSION_SHARE,
    JOB_HEADER,
    KIND_HEADER,
    MAX_RESULT_BYTES,
    OPERATIONS,
    STREAM,
    Cancelled,
    CancelRequested,
    Completed,
    Deleted,
    Event,
    FileDeleted,
    FileStored,
    InvalidParamsError,
    JobStatus,
    OperationSpec,
    Submitted,
    check_llm_endpoint,
    control_subject,
    deleted_subject,
    encode_event,
    events_subject,
    files_subject,
    operation,
    result_size,
    schedule_subject,
    submit_subject,
    utcnow,
    validate_params,
)
from streams import TERMINAL_STATUSES as TERMINAL

_envelope_decoder = msgspec.json.Decoder(EventEnvelope)

COMPILEO_STATUS = {
    JobStatus.SCHEDULED: JobStatus.PENDING,
    JobStatus.RETRYING: JobStatus.RUNNING,
}
"""Compileo knows five statuses; a scheduled job is still pending, a retrying one still running."""


def job_view(row: JobRow, queue_position: QueuePosition | None = None) -> Job:
    """The client's view of a job row."""
    return Job(
        id=row.id, type=row.type, pool=row.pool, status=row.status, title=row.title,
        description=row.description, params=row.params, file_id=row.file_id, file_name=row.file_name,
        progress=row.progress,
        current_step=row.current_step, result=row.result, error=row.error, attempt=row.attempt,
        max_attempts=row.max_attempts, timeout_s=row.timeout_s, priority=row.priority, owner=row.owner,
        parent_id=row.parent_id, worker=row.worker, held_by=row.held_by, exhausted=row.exhausted,
        client_request_id=row.client_request_id, scheduled_for=row.scheduled_for,
        callback_url=row.callback_url, callback_status=row.callback_status,
        queue_position=queue_position, last_event_id=row.last_seq, created_at=row.created_at,
        started_at=row.started_at, completed_at=row.completed_at, updated_at=row.updated_at,
    )  # fmt: skip


def compileo_status_name(status: str) -> str:
    """A jobcast status as one of Compileo's five."""
    return str(COMPILEO_STATUS.get(JobStatus(status), status))


def compileo_status(job: Job) -> JobStatusView:
    """A job in the Compileo status shape."""
    return JobStatusView(
        job_id=job.id, status=COMPILEO_STATUS.get(JobStatus(job.status), job.status), progress=job.progress,
        current_step=job.current_step, result=job.result, error=job.error, created_at=job.created_at,
        started_at=job.started_at, completed_at=job.completed_at, updated_at=job.updated_at,
    )  # fmt: skip


def compileo_update(payload: bytes, job: Job) -> StatusUpdate:
    """One Compileo stream message from an event envelope; result and error only at the end."""
    env = _envelope_decoder.decode(payload)
    status = COMPILEO_STATUS.get(JobStatus(env.status), env.status)
    final = JobStatus(env.status).terminal
    return StatusUpdate(
        job_id=env.job_id, status=status, progress=env.progress, current_step=env.current_step,
        timestamp=env.ts, result=job.result if final else None,
        error=job.error if env.status == JobStatus.FAILED else None,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What GET /api/v1/jobs may filter on."""

    owner: str | None
    statuses: frozenset[str] = frozenset()
    type: str | None = None
    active: bool = False
    parent_id: str | None = None
    include_children: bool = False
    """Batch children are left out unless asked for (or `parent_id` is given)."""
    exhausted: bool | None = None


class JobService:
    """Reads go to SQLite through short sessions; writes are events published to JetStream."""

    def __init__(
        self, settings: Settings, db: Database, js: JetStreamContext, projection: Projection, hub: Hub
    ) -> None:
        self.settings = settings
        self.db = db
        self.js = js
        self.projection = projection
        self.hub = hub
        self.open_streams: Counter[str] = Counter()
        """Open SSE, WebSocket and long-poll connections per owner."""
        self.sse = SseFanout(hub, settings.sse_ping_s, settings.slow_client_grace_s)
        """The job event streams' followers (`/jobs/{id}/events`)."""
        self._storage: tuple[float, int, int] = (float("-inf"), 0, -1)
        """When the stream's size was last read, its bytes and its max_bytes (-1: no limit)."""

    def check_stream_quota(self, owner: str | None) -> None:
        """429 before a stream opens when its owner already holds the most it may (0: no quota)."""
        quota = self.settings.max_streams_per_owner
        if quota > 0 and self.open_streams[owner or "*"] >= quota:
            raise TooManyError(
                f"too many open streams for this key ({self.settings.max_streams_per_owner}); close some first"
            )

    @contextlib.contextmanager
    def counted_stream(self, owner: str | None) -> Iterator[None]:
        """Count a stream as open for its owner while the block runs."""
        self.open_streams[owner or "*"] += 1
        try:
            yield
        finally:
            self.open_streams[owner or "*"] -= 1

    # reads --------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None, *, positioned: bool = True) -> Job:
        """The job, if `owner` may see it (None: any owner); raises NotFoundError. Without
        `positioned`, no queue-position counts (for views that do not show it, e.g. Compileo's)."""
        with self.db.reader.connect() as conn:  # two indexed reads: quicker than a thread hop
            row = self._visible_row(conn, job_id, owner)
            return job_view(row, queue_position(conn, row) if positioned else None)

    async def check_visible(self, job_id: str, owner: str | None) -> None:
        """NotFoundError unless the job exists for `owner`; unlike `get`, no queue-position counts
        (two COUNTs over the pool's pending jobs per SSE connect made thousands of connects slow)."""
        with self.db.reader.connect() as conn:
            self._visible_row(conn, job_id, owner)

    @staticmethod
    def _visible_row(conn: Connection, job_id: str, owner: str | None) -> JobRow:
        """One indexed read on the synchronous reader; NotFoundError for another owner's job too."""
        found = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).first()
        if found is None or (owner is not None and found.owner != owner):
            raise not_found("job", job_id)
        return JobRow(**found._mapping)

    @staticmethod
    async def _row(session: AsyncSession, job_id: str, owner: str | None) -> JobRow:
        row = await session.get(JobRow, job_id)
        if row is None or (owner is not None and row.owner != owner):
            raise not_found("job", job_id)
        return row

    async def children(self, job_id: str, owner: str | None) -> list[Job]:
        """A batch's children in submit order (none for a single job)."""
        async with self.db.session() as session:
            await self._row(session, job_id, owner)
            rows = await session.scalars(
                select(JobRow).where(JobRow.parent_id == job_id).order_by(JobRow.submit_seq)
            )
            return await self._with_positions(session, list(rows))

    async def find(self, where: JobFilter, limit: int, offset: int) -> JobPage:
        """A page of jobs, newest first, and the total that match."""
        query = select(JobRow)
        if where.owner is not None:
            query = query.where(JobRow.owner == where.owner)
        statuses = set(where.statuses)
        if where.active:
            statuses = (statuses & ACTIVE_STATUSES) if statuses else set(ACTIVE_STATUSES)
            if not statuses:
                return JobPage(items=[], total=0, limit=limit, offset=offset)
        if statuses:
            query = query.where(JobRow.status.in_(sorted(statuses)))
        if where.type:
            query = query.where(JobRow.type == where.type)
        if where.parent_id is not None:
            query = query.where(JobRow.parent_id == where.parent_id)
        elif not where.include_children:
            query = query.where(JobRow.parent_id.is_(None))
        if where.exhausted is not None:
            query = query.where(JobRow.exhausted.is_(where.exhausted))
        async with self.db.session() as session:
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = await session.scalars(query.order_by(JobRow.submit_seq.desc()).limit(limit).offset(offset))
            items = await self._with_positions(session, list(rows))
        return JobPage(items=items, total=total or 0, limit=limit, offset=offset)

    @staticmethod
    async def _with_positions(session: AsyncSession, rows: list[JobRow]) -> list[Job]:
        """The jobs of a list, with their queue positions counted for all of them at once."""
        positions = await session.run_sync(page_positions, rows)
        return [job_view(row, positions[row.id]) for row in rows]

    async def history(
        self, job_id: str, after: int, limit: int | None = None
    ) -> tuple[list[EventRow], Job | None]:
        """The job's recorded events after `after` (the first `limit` of them), and the job, read in
        one snapshot."""
        query = select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > after).order_by(EventRow.seq)
        async with self.db.session() as session, session.begin():
            rows = list(await session.scalars(query.limit(limit) if limit is not None else query))
            job = await session.get(JobRow, job_id)
        return rows, (job_view(job) if job else None)

    async def owner_history(self, owner: str, after: int, limit: int) -> list[EventRow]:
        """The first `limit` recorded events after `after` of all of `owner`'s jobs, in stream order."""
        async with self.db.session() as session:
            return list(
                await session.scalars(
                    select(EventRow)
                    .join(JobRow, JobRow.id == EventRow.job_id)
                    .where(JobRow.owner == owner, JobRow.last_seq > after, EventRow.seq > after)
                    .order_by(EventRow.seq, EventRow.id)
                    .limit(limit)
                )
            )

    async def follow(
        self, job_id: str, owner: str, after: int = 0, cut_off: asyncio.Future[None] | None = None,
        *, access: str | None,
    ) -> AsyncIterator[Applied | None]:  # fmt: skip
        """The job's events after `after`: history first, then live, ending after the job ends.
        Counted in `owner`'s stream quota; ends at once unless the job is `access`'s (None: any).

        Yields None whenever nothing happened for `sse_ping_s`, so callers can send a keep-alive.
        Raises TooSlowError (after the last event yielded) once the caller has fallen more than
        the client buffer behind; `cut_off` is completed at the moment it is cut off, for a caller
        busy with a write meanwhile.
        """
        with self.hub.subscribe([job_id]) as sub, self.counted_stream(owner):
            sub.cut_off = cut_off
            job: Job | None = None
            last = after
            while True:  # the history, a page at a time
                history, job = await self.history(job_id, last, HISTORY_PAGE)
                if job is None or (access is not None and job.owner != access):
                    return
                for row in history:
                    last = row.seq
                    yield Applied(row.seq, job_id, job.owner, row.kind, "", False, row.payload)
                if len(history) < HISTORY_PAGE:
                    break
            if JobStatus(job.status).terminal and job.last_event_id <= last:
                return
            while True:
                try:
                    async with asyncio.timeout(self.settings.sse_ping_s):
                        item = await sub.get()
                except TimeoutError:
                    yield None
                    continue
                except TooSlowError:
                    # Asked for more, so the caller is through with what came before: everything up
                    # to `last` (the history read while live events piled up included).
                    raise TooSlowError(last) from None
                if item.seq <= last:
                    continue
                last = item.seq
                yield item
                if item.ends:
                    return

    async def wait_change(
        self, job_id: str, owner: str, timeout: float, current_status: str | None, since: int | None,
        view: Callable[[str], str] = str, *, access: str | None, positioned: bool = True,
    ) -> Job:  # fmt: skip
        """Long-poll: the job once its status differs from `current_status` (or, with `since`,
        once it has an event newer than that), else at the timeout. Statuses are compared as
        `view` maps them (e.g. `compileo_status_name`, where retrying is still running). Counted
        in `owner`'s stream quota; NotFoundError unless the job is `access`'s (None: any)."""
        self.check_stream_quota(owner)
        with self.hub.subscribe([job_id]) as sub, self.counted_stream(owner):
            job = await self.get(job_id, access, positioned=positioned)
            reference = view(current_status or job.status)
            if since is not None and job.last_event_id > since:
                return job
            if since is None and (
                view(job.status) != reference or (current_status is None and job.status in TERMINAL)
            ):
                return job
            deadline = asyncio.get_running_loop().time() + timeout
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    async with asyncio.timeout(remaining):
                        item = await sub.get()
                except (TimeoutError, TooSlowError):  # cut off: the answer is the job as it is now
                    break
                if (since is not None and item.seq > since) or (
                    since is None and view(item.status) != reference
                ):
                    break
            return await self.get(job_id, access, positioned=positioned)

    # commands -----------------------------------------------------------------------

    async def submit(
        self, body: SubmitJob, owner: str, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Validate and publish one submission; returns the job once the projection has it, and
        whether it is new (False: the idempotency key named an existing job)."""
        spec = operation(body.type)
        params = validate_params(spec, body.params, self.settings.llm_endpoints)
        file_name = await self._check_input(spec, body.file_id, owner, "`$.file_id`")
        scheduled_for = _utc(body.scheduled_for)
        key = body.client_request_id or idempotency_key
        if key and (existing := self._keyed(owner, key)) is not None:
            return existing, False
        await self.check_storage()
        for job_id in _candidate_ids(owner, key):
            event = Submitted(
                job_id=job_id, type=spec.name, pool=spec.pool, owner=owner, params=params, title=body.title,
                description=body.description or "", file_id=body.file_id, priority=body.priority,
                max_attempts=body.max_attempts or spec.max_attempts, client_request_id=key,
                scheduled_for=scheduled_for, callback_url=body.callback_url,
                timeout_s=body.timeout_s, file_name=file_name, cache=body.cache,
            )  # fmt: skip
            with self.projection.expecting(job_id):
                try:
                    ack = await self.publish(event, fresh=key is not None)
                except _TombstonedError:
                    continue  # the key's job of this id was deleted: the next id is a new job
                handoff = await self._applied(ack.seq, job_id)
            if handoff is not None and handoff.row.owner == owner:
                return job_view(handoff.row, handoff.position), not ack.duplicate
            if (job := await self._existing(job_id, owner)) is not None:
                return job, not ack.duplicate  # not handed over: read it back
            if not ack.duplicate:
                raise not_found("job", job_id)
            # A duplicate of a submission whose job is gone (deleted, its tombstone expired
            # within the duplicate window): the next id.
        raise _key_exhausted(key)

    async def submit_batch(
        self, body: SubmitBatch, owner: str, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """A parent job and one child per file id or item, each an ordinary job of its pool."""
        spec = operation(body.type)
        if (body.file_ids is None) == (body.items is None):
            raise InvalidParamsError("give exactly one of `file_ids` or `items` - at `$`")
        items = body.items if body.items is not None else [BatchItem(file_id=f) for f in body.file_ids or []]
        if not items:
            raise InvalidParamsError("a batch needs at least one file or item - at `$.items`")
        names = []
        for index, item in enumerate(items):
            where = f"`$.file_ids[{index}]`" if body.file_ids is not None else f"`$.items[{index}].file_id`"
            names.append(await self._check_input(spec, item.file_id, owner, where))
        check_llm_endpoint(spec, body.params, self.settings.llm_endpoints)  # named where it was given
        children_params = []
        for index, item in enumerate(items):
            try:
                merged = {**body.params, **item.params}
                children_params.append(validate_params(spec, merged, self.settings.llm_endpoints))
            except InvalidParamsError as exc:
                raise InvalidParamsError(
                    str(exc).replace("`$.params", f"`$.items[{index}].params", 1)
                ) from None
        scheduled_for = _utc(body.scheduled_for)
        key = body.client_request_id or idempotency_key
        if key and (existing := self._keyed(owner, key)) is not None:
            return existing, False
        await self.check_storage()
        common: dict[str, Any] = {
            "owner": owner, "priority": body.priority, "max_attempts": body.max_attempts or spec.max_attempts,
            "scheduled_for": scheduled_for,
        }  # fmt: skip
        for parent_id in _candidate_ids(owner, key):
            parent = Submitted(
                job_id=parent_id, type=f"batch_{spec.name}", pool=BATCH_POOL, params={"type": spec.name,
                "params": body.params, "count": len(items)}, title=body.title, description=body.description,
                client_request_id=key, callback_url=body.callback_url, **(common | {"max_attempts": 1}),
            )  # fmt: skip
            try:
                ack = await self.publish(parent, fresh=key is not None)
            except _TombstonedError:
                continue
            if not ack.duplicate:
                break
            await self._applied(ack.seq, parent_id)
            if await self._existing(parent_id, owner) is not None:
                break  # a concurrent duplicate: its children are duplicates too
        else:
            raise _key_exhausted(key)
        children = [
            Submitted(
                job_id=str(uuid.uuid5(uuid.UUID(parent_id), str(index))),
                type=spec.name,
                pool=spec.pool,
                params=params,
                title=item.title or f"{body.title or spec.name} #{index + 1}",
                file_id=item.file_id,
                file_name=name,
                parent_id=parent_id,
                timeout_s=body.timeout_s,
                cache=body.cache,
                **common,
            )
            for index, (item, params, name) in enumerate(zip(items, children_params, names, strict=True))
        ]
        acks = await asyncio.gather(*(self.publish(child) for child in children))
        await self._applied(max([ack.seq, *(a.seq for a in acks)]), parent_id)
        return await self.get(parent_id, owner), not ack.duplicate

    async def cancel(self, job_id: str, owner: str | None, reason: str = "cancelled by request") -> Job:
        """Cancel an active job (a batch: its active children too). Queued jobs end at once; a
        running job is stopped by its worker, which publishes `cancelled`."""
        async with self.db.session() as session:
            row = await self._row(session, job_id, owner)
            if JobStatus(row.status).terminal:
                raise ConflictError(
                    f"job {job_id} is already {row.status}; only active jobs can be cancelled"
                )
            children = list(
                await session.scalars(
                    select(JobRow).where(
                        JobRow.parent_id == job_id, JobRow.status.in_(sorted(ACTIVE_STATUSES))
                    )
                )
            )
        # The parent first: once it is cancelled, its children's cancels cannot make it `failed`.
        first = await self._cancel_one(row, reason)
        seqs = await asyncio.gather(*(self._cancel_one(child, reason) for child in children))
        await self._applied(max([first, *seqs]), job_id)
        return await self.get(job_id, owner)

    async def _cancel_one(self, row: JobRow, reason: str) -> int:
        ack = await self.publish(CancelRequested(job_id=row.id, attempt=row.attempt, reason=reason))
        if row.status == JobStatus.RUNNING and row.pool != BATCH_POOL:
            return ack.seq  # its worker stops it and says so
        ended = Cancelled(job_id=row.id, attempt=row.attempt, reason=reason)
        return (await self.publish(ended, msg_id=f"{row.id}:{row.attempt}:cancelled:api")).seq

    async def retry(self, job_id: str, owner: str | None) -> Job:
        """Run a failed or cancelled job again as a new attempt (a batch: its unfinished children)."""
        async with self.db.session() as session:
            row = await self._row(session, job_id, owner)
            if row.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise ConflictError(
                    f"job {job_id} is {row.status}; only failed or cancelled jobs can be retried"
                )
            children = list(
                await session.scalars(
                    select(JobRow)
                    .where(
                        JobRow.parent_id == job_id, JobRow.status.in_([JobStatus.FAILED, JobStatus.CANCELLED])
                    )
                    .order_by(JobRow.submit_seq)
                )
            )
        for each in (row, *children):  # the allowlist may have changed since the job was submitted
            if (spec := OPERATIONS.get(each.type)) is not None:
                check_llm_endpoint(spec, each.params, self.settings.llm_endpoints)
        await self.check_storage()
        acks = [await self.publish(_resubmission(row))]
        acks += await asyncio.gather(*(self.publish(_resubmission(child)) for child in children))
        await self._applied(max(a.seq for a in acks), job_id)
        return await self.get(job_id, owner)

    async def force_complete(self, job_id: str, result: dict[str, Any] | None) -> Job:
        """Admin: mark an active job completed with `result`; a worker running it is told to stop."""
        if (size := result_size(result)) > MAX_RESULT_BYTES:
            raise InvalidParamsError(
                f"a result is at most {MAX_RESULT_BYTES} bytes of JSON; this one is {size} - at `$.result`"
            )
        async with self.db.session() as session:
            row = await self._row(session, job_id, None)
        if JobStatus(row.status).terminal:
            raise ConflictError(f"job {job_id} is already {row.status}")
        done = Completed(job_id=job_id, attempt=row.attempt, result=result)
        ack = await self.publish(done, msg_id=f"{job_id}:{row.attempt}:completed:admin")
        # Then stop a worker that runs it: its `cancelled` comes after `completed` and changes nothing.
        stop = CancelRequested(job_id=job_id, attempt=row.attempt, reason="force-completed by an admin")
        await self.publish(stop)
        await self._applied(ack.seq, job_id)
        return await self.get(job_id, None)

    async def _check_input(
        self, spec: OperationSpec, file_id: str | None, owner: str, where: str
    ) -> str | None:
        """An operation that reads a file needs one, and it must be the caller's; returns its name."""
        if not spec.needs_file:
            return None
        if file_id is None:
            raise InvalidParamsError(
                f"operation {spec.name!r} needs an input file: upload it, then give its id - at {where}"
            )
        async with self.db.session() as session:
            row = await session.get(FileRow, file_id)
        if row is None or row.owner != owner:
            raise not_found("file", file_id)
        return row.name

    async def _existing(self, job_id: str, owner: str) -> Job | None:
        try:
            return await self.get(job_id, owner)
        except NotFoundError:
            return None

    def _keyed(self, owner: str, key: str) -> Job | None:
        """The owner's job that `key` names now, whichever of the key's ids it has."""
        with self.db.reader.connect() as conn:  # one indexed read (ix_jobs_owner_key)
            found = conn.execute(
                select(JOBS)
                .where(JOBS.c.owner == owner, JOBS.c.client_request_id == key)
                .order_by(JOBS.c.submit_seq.desc())
                .limit(1)
            ).first()
            row = None if found is None else JobRow(**found._mapping)
            return None if row is None else job_view(row, queue_position(conn, row))

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
        to the stream's scheduler), tombstones to jobs.deleted, everything else to the job's
        events or control subject. `fresh`: refuse a submission whose job id has a tombstone
        (raises _TombstonedError; checked by the server, atomically with the publish)."""
        headers: dict[str, str] = {KIND_HEADER: event.kind, JOB_HEADER: event.job_id}
        if isinstance(event, Submitted):
            headers["Nats-Msg-Id"] = msg_id or f"{event.job_id}:{event.attempt}"
            if fresh:
                headers["Nats-Expected-Last-Subject-Sequence"] = "0"
                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = deleted_subject(event.job_id)
            if event.pool == BATCH_POOL:
                subject = events_subject(event.job_id)
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
                raise _TombstonedError(event.job_id) from None
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
        await self._applied(seq, ident)

    async def _applied(self, seq: int, job_id: str) -> Handoff | None:
        """Read-your-writes: wait until the projection has applied `seq`; returns the job as that
        batch left it when the batch touched it (see `Projection.wait_for`)."""
        try:
            return await self.projection.wait_for(seq, self.settings.submit_timeout_s, job_id)
        except TimeoutError:
            raise UnavailableError(
                f"job {job_id} was accepted but is not visible yet; poll GET /api/v1/jobs/{job_id}"
            ) from None


_IDEMPOTENCY_NAMESPACE = uuid.UUID("0f0b7a54-5b0e-4d43-8c36-8a1f7a2a6a11")
MAX_KEY_GENERATIONS = 64
"""A key names at most this many jobs in turn, each deleted before the next (see `_candidate_ids`)."""
WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check."""
STORE_FULL = frozenset({10077, 10023})
"""JetStream's error codes for a refused store (stream at its limit) and for insufficient resources."""


class _TombstonedError(Exception):
    """The submission's job id has a tombstone: a job of that id was deleted."""


def _job_id(owner: str, key: str | None, generation: int = 0) -> str:
    """A random id, or with an idempotency key one derived from owner and key, so concurrent
    duplicates collide on the same id (and on the same Nats-Msg-Id). Each time the key's job is
    deleted, the key moves on to its next generation: a resubmission is a new job, never the
    deleted one, so nothing meant for the old job (a client's late cancel) reaches the new one."""
    if key is None:
        return str(uuid.uuid4())
    return str(
        uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{owner}\n{key}" + (f"\n{generation}" if generation else ""))
    )


def _candidate_ids(owner: str, key: str | None) -> Iterator[str]:
    """The ids a submission tries in turn: one random id, or the key's ids by generation (the
    server refuses the ids of deleted jobs while their tombstones last)."""
    if key is None:
        yield _job_id(owner, None)
        return
    for generation in range(MAX_KEY_GENERATIONS):
        yield _job_id(owner, key, generation)


def _key_exhausted(key: str | None) -> ConflictError:
    return ConflictError(
        f"client_request_id {key!r} already named {MAX_KEY_GENERATIONS} jobs that were deleted; use a new one"
    )


def _utc(given: str | None) -> datetime | None:
    """A client's RFC 3339 time in UTC; a naive one is taken to be UTC already."""
    if given is None:
        return None
    try:
        moment = msgspec.convert(given, datetime)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(f"{exc}: {given!r} - at `$.scheduled_for`") from None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _resubmission(row: JobRow) -> Submitted:
    """The job's spec again, as its next attempt."""
    return Submitted(
        job_id=row.id, attempt=row.attempt + 1, type=row.type, pool=row.pool, owner=row.owner,
        params=row.params, title=row.title, description=row.description, file_id=row.file_id,
        parent_id=row.parent_id, max_attempts=row.max_attempts, priority=row.priority,
        created_at=row.created_at, client_request_id=row.client_request_id, callback_url=row.callback_url,
        timeout_s=row.timeout_s, file_name=row.file_name, cache=row.cache is not False,
    )  # fmt: skip
