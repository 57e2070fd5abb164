"""Deleting jobs for good: purge their subjects from the JOBS stream, leave a tombstone, and on a
timer delete the finished jobs that have outlived their retention.

A delete purges every subject of the job (and of a batch's children) first, then publishes
its tombstone, `deleted` on `jobs.deleted.<id>` with a TTL: every API projection removes the
rows when it applies the tombstone (one that was behind included), a rebuilt projection
finds nothing of the job, and the tombstone expires by itself. Purging first frees room
in a stream that is full, so a delete works exactly when the stream refuses everything else.
Both steps are idempotent, so two instances deleting the same job at once (two sweeps) are
harmless: the second purge finds nothing, the second tombstone is a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import datetime, timedelta

import nats.errors
from nats.js.errors import NotFoundError
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import aliased

from app._db import FileRow, JobRow
from app._exceptions import ConflictError, UnavailableError, not_found, queue_unavailable
from app._files import FileService
from app._publisher import Publisher
from app._schemas import CleanupReport
from streams import (
    ACTIVE_STATUSES,
    PIPELINE_POOL,
    STREAM,
    Deleted,
    FileStored,
    JobStatus,
    TaskSupervisor,
    files_subject,
    job_subjects,
    utcnow,
)

log = logging.getLogger("jobcast.retention")

CHUNK = 200
"""Jobs one cleanup pass reads at a time (a long backlog is worked through in passes)."""
PARALLEL = 16
"""Jobs deleted at once, and purge requests in flight at once."""
ENDED_BY_REQUEST = (JobStatus.COMPLETED, JobStatus.CANCELLED)


class Retention:
    """Deletes jobs (DELETE, admin cleanup) and runs the retention sweep."""

    def __init__(self, service: Publisher, files: FileService) -> None:
        self.service = service
        self.files = files
        self.settings = service.settings

    def start(self, tasks: TaskSupervisor) -> None:
        """Run the retention sweep as task `retention-sweep` (it only waits when
        JOBCAST_RETENTION_DAYS is 0); a pass cut short is finished by the next one (deletes are
        idempotent)."""
        tasks.start("retention-sweep", self._sweep_forever)

    # one job --------------------------------------------------------------------------------

    async def delete(self, job_id: str, owner: str | None, files: bool = False) -> list[str]:
        """Delete a finished job (a batch or pipeline: with its children) and with `files` the files
        they produced; 409 while it is active, a worker still holds it, or it is a pipeline's stage.
        Returns the ids deleted."""
        async with self.service.db.session() as session:
            row = await session.get(JobRow, job_id)
            if row is None or (owner is not None and row.owner != owner):
                raise not_found("job", job_id)
            parent = await session.get(JobRow, row.parent_id) if row.parent_id else None
            if parent is not None and parent.pool == PIPELINE_POOL:
                # Its place and its outputs are the next stage's input: a pipeline loses no stage.
                raise ConflictError(
                    f"job {job_id} is a stage of pipeline {parent.id}: delete the pipeline"
                    f" (DELETE /api/v1/jobs/{parent.id}), which deletes its stages with it"
                )
            rows = [row, *(await session.scalars(select(JobRow).where(JobRow.parent_id == job_id)))]
        for each in rows:
            if not JobStatus(each.status).terminal:
                raise ConflictError(f"job {each.id} is {each.status}; cancel it before deleting it")
            if each.held_by is not None:
                raise ConflictError(
                    f"job {each.id} is still held by worker {each.held_by}; try again shortly"
                )
        if files:  # first: the files' job_id is how they are found
            await self.files.delete_produced([each.id for each in rows])
        await self._remove(rows, files)
        return [each.id for each in rows]

    async def _remove(self, rows: list[JobRow], files: bool) -> None:
        """Purge the jobs' subjects, then publish the first one's tombstone and wait until this
        instance's projection has dropped their rows."""
        head = rows[0]
        if not files:
            await self._move_file_records([row.id for row in rows])
        subjects = [s for row in rows for s in job_subjects(row.id, row.pool, row.priority)]
        try:
            for start in range(0, len(subjects), PARALLEL):
                chunk = subjects[start : start + PARALLEL]
                await asyncio.gather(*(self.service.js.purge_stream(STREAM, subject=s) for s in chunk))
        except (nats.errors.Error, TimeoutError) as exc:
            raise queue_unavailable(exc) from exc
        tombstone = Deleted(job_id=head.id, attempt=head.attempt, files=files)
        ack = await self.service.publish(tombstone, msg_id=f"{head.id}:deleted")
        await self.service.wait_applied(ack.seq, head.id)

    async def _move_file_records(self, job_ids: list[str]) -> None:
        """Workers before this version published a produced file's `file_stored` on its job's
        events subject, which the purge empties: publish it again on the file's own subject first,
        so that the file, which stays, is still there after a rebuild."""
        async with self.service.db.session() as session:
            produced = list(await session.scalars(select(FileRow).where(FileRow.job_id.in_(job_ids))))
        for row in produced:
            try:
                await self.service.js.get_last_msg(STREAM, files_subject(row.id), direct=True)
                continue  # on its own subject already
            except NotFoundError:
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                raise queue_unavailable(exc) from exc
            record = FileStored(
                job_id=row.job_id or "", file_id=row.id, owner=row.owner, name=row.name,
                content_type=row.content_type, size=row.size, sha256=row.sha256, ts=row.created_at,
            )  # fmt: skip
            await self.service.publish(record, msg_id=f"file:{row.id}:moved")

    # many jobs ------------------------------------------------------------------------------

    async def cleanup(
        self, days_old: int, failed_days_old: int | None = None, files: bool = False
    ) -> CleanupReport:
        """Delete the completed and cancelled jobs that ended more than `days_old` days ago, and
        with `failed_days_old` the failed ones older than that (else failed jobs are kept); with
        `files`, the files they produced too."""
        statuses, removed_files = await self._delete_expired(days_old, failed_days_old, files)
        cutoff = utcnow() - timedelta(days=days_old)
        async with self.service.db.session() as session:
            kept = await session.scalar(
                select(func.count()).where(
                    JobRow.parent_id.is_(None),
                    JobRow.status == JobStatus.FAILED,
                    JobRow.completed_at < cutoff,
                )
            )
        return CleanupReport(
            days_old=days_old, deleted=sum(statuses.values()), completed=statuses[JobStatus.COMPLETED],
            cancelled=statuses[JobStatus.CANCELLED], failed_kept=kept or 0, failed=statuses[JobStatus.FAILED],
            files=removed_files,
        )  # fmt: skip

    async def _delete_expired(
        self, days_old: float, failed_days_old: float | None, files: bool
    ) -> tuple[Counter[str], int]:
        """Delete what `cleanup` describes, a chunk at a time; the top-level jobs deleted by status,
        and the number of files."""
        now = utcnow()
        cutoff = now - timedelta(days=days_old)
        failed_cutoff = None if failed_days_old is None else now - timedelta(days=failed_days_old)
        statuses: Counter[str] = Counter()
        removed_files = 0
        slots = asyncio.Semaphore(PARALLEL)

        async def remove(rows: list[JobRow]) -> None:
            nonlocal removed_files
            async with slots:
                if files:
                    removed_files += await self.files.delete_produced([row.id for row in rows])
                await self._remove(rows, files)
                statuses[rows[0].status] += 1

        while groups := await self._expired(cutoff, failed_cutoff):
            await asyncio.gather(*(remove(rows) for rows in groups))
            if len(groups) < CHUNK:
                break
        return statuses, removed_files

    async def _expired(self, cutoff: datetime, failed_cutoff: datetime | None) -> list[list[JobRow]]:
        """The oldest finished top-level jobs past their retention that nothing holds, each with
        its children (a batch whose children still run or are held waits)."""
        child = aliased(JobRow)
        busy_child = exists().where(
            child.parent_id == JobRow.id,
            or_(child.held_by.is_not(None), child.status.in_(sorted(ACTIVE_STATUSES))),
        )
        due = and_(JobRow.status.in_(ENDED_BY_REQUEST), JobRow.completed_at < cutoff)
        if failed_cutoff is not None:
            due = or_(due, and_(JobRow.status == JobStatus.FAILED, JobRow.completed_at < failed_cutoff))
        async with self.service.db.session() as session:
            heads = list(
                await session.scalars(
                    select(JobRow)
                    .where(JobRow.parent_id.is_(None), JobRow.held_by.is_(None), due, ~busy_child)
                    .order_by(JobRow.completed_at)
                    .limit(CHUNK)
                )
            )
            children = await session.scalars(
                select(JobRow)
                .where(JobRow.parent_id.in_([head.id for head in heads]))
                .order_by(JobRow.submit_seq)
            )
        families: dict[str, list[JobRow]] = {head.id: [head] for head in heads}
        for row in children:
            families[row.parent_id or ""].append(row)
        return list(families.values())

    # the sweep ------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """One retention pass with the configured ages; the number of jobs it deleted."""
        if self.settings.retention_days <= 0:
            return 0
        failed = self.settings.retention_failed_days
        statuses, removed_files = await self._delete_expired(
            self.settings.retention_days, failed if failed > 0 else None, self.settings.retention_files
        )
        if statuses:
            log.info(
                "retention deleted %d job(s) (%s) and %d file(s)",
                sum(statuses.values()), ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())), removed_files,
            )  # fmt: skip
        return sum(statuses.values())

    async def _sweep_forever(self) -> None:
        # A partial projection could show a job as ended that a later event (a retry) revived.
        await self.service.projection.caught_up.wait()
        while True:
            try:
                await self.sweep()
            except UnavailableError as exc:  # NATS away, or the stream full: the next pass retries
                log.warning("retention sweep: %s; next pass in %.0f s", exc, self.settings.retention_sweep_s)
            await asyncio.sleep(self.settings.retention_sweep_s)
