"""Job queries: the projection's jobs and events, read through short sessions."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app._db import Database, EventRow, JobRow
from app._eta import EtaBoard, eta_now
from app._exceptions import NotFoundError, not_found
from app._lean import lean_reads
from app._queue import WAITING, page_positions, queue_position
from app._schemas import Job, JobPage, QueuePosition
from streams import ACTIVE_STATUSES, JobStatus

QUICK_PAGE = 50
"""A history page this short (a follower's first: most jobs have fewer events) is read on the
synchronous reader, as a job by id is. Thousands of followers connecting at once each waited for
one of the async pool's 15 connections and its thread hop; past the pool's 30 s wait, their streams
failed (P3, 10k clients each on its own job). Longer pages stay on the pool, off the event loop."""


def job_view(
    row: JobRow, queue_position: QueuePosition | None = None, estimated_start_s: float | None = None
) -> Job:
    """The client's view of a job row."""
    running = row.status == JobStatus.RUNNING
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
        eta_s=eta_now(row.eta_s, row.updated_at, datetime.now(UTC)) if running else None, estimated_start_s=estimated_start_s,
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


class JobQueries:
    """Reads of the projection (SQLite): jobs, their children and their recorded events."""

    def __init__(self, db: Database, eta: EtaBoard | None = None) -> None:
        self.db = db
        self.eta = eta
        """Learned speeds and live slots, for a waiting job's `estimated_start_s` (None: no estimates)."""

    async def get(self, job_id: str, owner: str | None, *, positioned: bool = True) -> Job:
        """The job, if `owner` may see it (None: any owner); raises NotFoundError. Without
        `positioned`, no queue-position counts (for views that do not show it, e.g. Compileo's)."""
        with self.db.reader.connect() as conn:  # two indexed reads: quicker than a thread hop
            row = self._visible_row(conn, job_id, owner)
            if not positioned:
                return job_view(row)
            return self._positioned(conn, row)

    def _positioned(self, conn: Connection, row: JobRow) -> Job:
        """The job with its queue position and, while it waits, its estimated start."""
        position = queue_position(conn, row)
        starts = {} if self.eta is None else self.eta.starts(conn, [row], {row.id: position})
        return job_view(row, position, starts.get(row.id))

    def submitted(self, row: JobRow, position: QueuePosition | None) -> Job:
        """The 202 view of a job just submitted. Its estimated start costs no statement when it
        will start at once (nothing ahead, a free slot in its pool); one when it waits."""
        if self.eta is None or row.status not in WAITING or position is None:
            return job_view(row, position)
        start = self.eta.start_at_once(row.pool, position)
        if start is None and self.eta.speeds and self.eta.slots(row.pool):  # else nothing to estimate with
            with self.db.reader.connect() as conn:
                start = self.eta.starts(conn, [row], {row.id: position}).get(row.id)
        return job_view(row, position, start)

    async def check_visible(self, job_id: str, owner: str | None) -> None:
        """NotFoundError unless the job exists for `owner`; unlike `get`, no queue-position counts
        (two COUNTs over the pool's pending jobs per SSE connect made thousands of connects slow)."""
        with self.db.reader.connect() as conn, lean_reads(conn) as (reads, cursor):
            found = reads.owner_of(cursor, job_id)
        if found is None or (owner is not None and found != owner):
            raise not_found("job", job_id)

    @staticmethod
    def _visible_row(conn: Connection, job_id: str, owner: str | None) -> JobRow:
        """One indexed read on the synchronous reader; NotFoundError for another owner's job too."""
        with lean_reads(conn) as (reads, cursor):
            found = reads.job(cursor, job_id)
        if found is None or (owner is not None and found.owner != owner):
            raise not_found("job", job_id)
        return found

    @staticmethod
    async def row(session: AsyncSession, job_id: str, owner: str | None) -> JobRow:
        """The job's row in `session`, if `owner` may see it (None: any); raises NotFoundError."""
        row = await session.get(JobRow, job_id)
        if row is None or (owner is not None and row.owner != owner):
            raise not_found("job", job_id)
        return row

    async def children(self, job_id: str, owner: str | None) -> list[Job]:
        """A batch's children in submit order (none for a single job)."""
        async with self.db.session() as session:
            await self.row(session, job_id, owner)
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

    async def _with_positions(self, session: AsyncSession, rows: list[JobRow]) -> list[Job]:
        """The jobs of a list, with their queue positions counted for all of them at once (and the
        estimated starts of the waiting ones, one statement per pool)."""
        positions = await session.run_sync(page_positions, rows)
        eta = self.eta
        starts = {} if eta is None else await session.run_sync(eta.starts, rows, positions)
        return [job_view(row, positions[row.id], starts.get(row.id)) for row in rows]

    async def history(
        self, job_id: str, after: int, limit: int | None = None
    ) -> tuple[list[EventRow], Job | None]:
        """The job's recorded events after `after` (the first `limit` of them), and the job, read in
        one snapshot."""
        if limit is not None and limit <= QUICK_PAGE:
            return self._history_now(job_id, after, limit)
        query = select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > after).order_by(EventRow.seq)
        async with self.db.session() as session, session.begin():
            rows = list(await session.scalars(query.limit(limit) if limit is not None else query))
            job = await session.get(JobRow, job_id)
        return rows, (job_view(job) if job else None)

    def _history_now(self, job_id: str, after: int, limit: int) -> tuple[list[EventRow], Job | None]:
        """`history` for a short page, on the synchronous reader, in one read transaction."""
        with self.db.reader.connect() as conn, lean_reads(conn) as (reads, cursor):
            cursor.execute("BEGIN")  # one snapshot for both
            try:
                events = reads.events_after(cursor, job_id, after, limit)
                job = reads.job(cursor, job_id)
            except BaseException:
                with contextlib.suppress(Exception):  # SQLite may have rolled back already
                    cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
        return events, (job_view(job) if job is not None else None)

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

    async def existing(self, job_id: str, owner: str) -> Job | None:
        """The job, or None when `owner` has none of that id."""
        try:
            return await self.get(job_id, owner)
        except NotFoundError:
            return None

    def keyed(self, owner: str, key: str) -> Job | None:
        """The owner's job that `key` names now, whichever of the key's ids it has."""
        with self.db.reader.connect() as conn:  # one indexed read (ix_jobs_owner_key)
            with lean_reads(conn) as (reads, cursor):
                found = reads.keyed(cursor, owner, key)
            return None if found is None else self._positioned(conn, found)
