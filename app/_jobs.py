"""Job queries and commands behind the controllers: read the projection, publish to the stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext
from sqlalchemy import func, select

from app._db import Database, EventRow, JobRow
from app._exceptions import UnavailableError, not_found
from app._hub import Applied, Hub
from app._projection import Projection
from app._schemas import EventEnvelope, Job, JobPage, JobStatusView, StatusUpdate, SubmitJob
from app._settings import Settings
from streams import (
    ACTIVE_STATUSES,
    JOB_HEADER,
    KIND_HEADER,
    JobStatus,
    Submitted,
    encode_event,
    operation,
    submit_subject,
    validate_params,
)
from streams import (
    TERMINAL_STATUSES as TERMINAL,
)

_envelope_decoder = msgspec.json.Decoder(EventEnvelope)

COMPILEO_STATUS = {
    JobStatus.SCHEDULED: JobStatus.PENDING,
    JobStatus.RETRYING: JobStatus.RUNNING,
}
"""Compileo knows five statuses; a scheduled job is still pending, a retrying one still running."""


def job_view(row: JobRow) -> Job:
    """The client's view of a job row."""
    return Job(
        id=row.id, type=row.type, pool=row.pool, status=row.status, title=row.title,
        description=row.description, params=row.params, file_id=row.file_id, progress=row.progress,
        current_step=row.current_step, result=row.result, error=row.error, attempt=row.attempt,
        max_attempts=row.max_attempts, priority=row.priority, owner=row.owner, parent_id=row.parent_id,
        worker=row.worker, last_event_id=row.last_seq, created_at=row.created_at,
        started_at=row.started_at, completed_at=row.completed_at, updated_at=row.updated_at,
    )  # fmt: skip


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

    # reads --------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None) -> Job:
        """The job, if `owner` may see it (None: any owner); raises NotFoundError."""
        async with self.db.session() as session:
            row = await session.get(JobRow, job_id)
        if row is None or (owner is not None and row.owner != owner):
            raise not_found("job", job_id)
        return job_view(row)

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
        async with self.db.session() as session:
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = await session.scalars(query.order_by(JobRow.submit_seq.desc()).limit(limit).offset(offset))
            items = [job_view(row) for row in rows]
        return JobPage(items=items, total=total or 0, limit=limit, offset=offset)

    async def history(self, job_id: str, after: int) -> tuple[list[EventRow], Job | None]:
        """The job's recorded events after `after`, and the job, read in one snapshot."""
        async with self.db.session() as session, session.begin():
            rows = list(
                await session.scalars(
                    select(EventRow)
                    .where(EventRow.job_id == job_id, EventRow.seq > after)
                    .order_by(EventRow.seq)
                )
            )
            job = await session.get(JobRow, job_id)
        return rows, (job_view(job) if job else None)

    async def follow(self, job_id: str, owner: str | None, after: int = 0) -> AsyncIterator[Applied | None]:
        """The job's events after `after`: history first, then live, ending after the job ends.

        Yields None whenever nothing happened for `sse_ping_s`, so callers can send a keep-alive.
        """
        with self.hub.subscribe([job_id]) as sub:
            history, job = await self.history(job_id, after)
            if job is None or (owner is not None and job.owner != owner):
                return
            last = after
            for row in history:
                last = row.seq
                yield Applied(row.seq, job_id, job.owner, row.kind, "", False, row.payload)
            if JobStatus(job.status).terminal and job.last_event_id <= last:
                return
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), self.settings.sse_ping_s)
                except TimeoutError:
                    yield None
                    continue
                if item.seq <= last:
                    continue
                last = item.seq
                yield item
                if item.ends:
                    return

    async def wait_change(
        self, job_id: str, owner: str | None, timeout: float, current_status: str | None, since: int | None
    ) -> Job:
        """Long-poll: the job once its status differs from `current_status` (or, with `since`,
        once it has an event newer than that), else at the timeout."""
        with self.hub.subscribe([job_id]) as sub:
            job = await self.get(job_id, owner)
            reference = current_status or job.status
            if since is not None and job.last_event_id > since:
                return job
            if since is None and (
                job.status != reference or (current_status is None and job.status in TERMINAL)
            ):
                return job
            deadline = asyncio.get_running_loop().time() + timeout
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), remaining)
                except TimeoutError:
                    break
                if (since is not None and item.seq > since) or (since is None and item.status != reference):
                    break
            return await self.get(job_id, owner)

    # commands -----------------------------------------------------------------------

    async def submit(self, body: SubmitJob, owner: str) -> Job:
        """Validate, publish one submission, and return the job once the projection has it."""
        spec = operation(body.type)
        params = validate_params(spec, body.params)
        job_id = str(uuid.uuid4())
        event = Submitted(
            job_id=job_id, type=spec.name, pool=spec.pool, owner=owner, params=params, title=body.title,
            description=body.description, file_id=body.file_id, priority=body.priority,
            max_attempts=body.max_attempts or spec.max_attempts,
        )  # fmt: skip
        await self._publish_and_apply(submit_subject(spec.pool, job_id), event, f"{job_id}:{event.attempt}")
        return await self.get(job_id, owner)

    async def _publish_and_apply(self, subject: str, event: Submitted, msg_id: str) -> int:
        headers: dict[str, Any] = {"Nats-Msg-Id": msg_id, KIND_HEADER: event.kind, JOB_HEADER: event.job_id}
        try:
            ack = await self.js.publish(subject, encode_event(event), headers=headers, timeout=5)
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"the job queue is unavailable ({type(exc).__name__}); try again") from exc
        try:
            await self.projection.wait_for(ack.seq, self.settings.submit_timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"job {event.job_id} was queued but is not visible yet; poll GET /api/v1/jobs/{event.job_id}"
            ) from None
        return ack.seq
