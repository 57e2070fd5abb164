"""One batch of the projection, in the writer thread: the jobs it touches, folded in memory,
each row written once, the batch parents derived from their children, and the bookmark, all in
one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec
from nats.aio.msg import Msg
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.engine.interfaces import DBAPICursor

from app._db import EVENTS, FILES, JOBS, JobRow
from app._family import Family
from app._fold import fold
from app._hub import Applied
from app._lean import LeanStatements, lean_statements
from app._queue import queue_positions
from app._schemas import EventEnvelope, QueuePosition
from app._stages import WAITING, derive_pipeline, in_plan, planned_types
from streams import (
    PIPELINE_POOL,
    TERMINAL_STATUSES,
    Deleted,
    Event,
    FileDeleted,
    FileStored,
    JobStatus,
    utcnow,
)

BOOKMARK = "jobs"
"""The bookmark row's name: the last stream sequence the projection applied."""
_encoder = msgspec.json.Encoder()


def _envelope(job: JobRow, seq: int, kind: str, attempt: int, ts: datetime, raw: bytes) -> bytes:
    """The client-facing envelope: the job's state after the event, and the raw event."""
    return _encoder.encode(
        EventEnvelope(
            seq=seq, job_id=job.id, kind=kind, status=job.status, progress=job.progress,
            current_step=job.current_step, attempt=attempt, ts=ts, event=msgspec.Raw(raw), eta_s=job.eta_s,
        )
    )  # fmt: skip


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """`items` in lists of at most `size` (SQLite bounds the parameters of one statement)."""
    return [items[start : start + size] for start in range(0, len(items), size)]


_MUTABLE = (
    "status", "attempt", "progress", "current_step", "result", "error", "worker", "held_by", "exhausted",
    "callback_status", "queue_seq", "last_seq", "started_at", "completed_at", "updated_at", "file_id",
    "file_name", "eta_s",
)  # fmt: skip
"""The columns `fold` and the parent derivation change; a job's spec never changes, but for the input
of a pipeline's stage, known once the stage before has completed."""
_CHILDREN = select(JOBS.c.id, JOBS.c.status, JOBS.c.progress, JOBS.c.submit_seq).where(
    JOBS.c.parent_id == bindparam("parent_id")
)
_STAGES = select(
    JOBS.c.id,
    JOBS.c.status,
    JOBS.c.progress,
    JOBS.c.submit_seq,
    JOBS.c.queue_seq,
    JOBS.c.type,
    JOBS.c.result,
    JOBS.c.error,
).where(JOBS.c.parent_id == bindparam("parent_id"))
"""A pipeline's children: its derivation also needs their latest submissions, types, results and errors."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """A job as the batch that applied a waited-for sequence left it, for the waiter's answer."""

    row: JobRow
    """A plain record (`job_record`), not for an ORM session."""
    position: QueuePosition | None
    """Its queue position, counted in the batch's transaction."""


@dataclass(frozen=True, slots=True)
class EventTimes:
    """What the metrics need of a job at the moment an event was applied to it."""

    type: str
    attempt: int
    created_at: datetime
    started_at: datetime | None


def _apply_file(conn: Connection, event: FileStored | FileDeleted, seq: int) -> None:
    if isinstance(event, FileDeleted):
        conn.execute(delete(FILES).where(FILES.c.id == event.file_id))
    elif conn.execute(select(FILES.c.id).where(FILES.c.id == event.file_id)).first() is not None:
        # Stored again: moved to its own subject before its job's were purged (app/_retention.py);
        # the row takes the new message's place, as a rebuild would.
        conn.execute(update(FILES).where(FILES.c.id == event.file_id).values(seq=seq))
    else:
        conn.execute(
            insert(FILES),
            {
                "id": event.file_id, "owner": event.owner, "name": event.name,
                "content_type": event.content_type, "size": event.size, "sha256": event.sha256,
                "job_id": event.job_id or None, "seq": seq, "created_at": event.ts,
            },
        )  # fmt: skip


class BatchWrites:
    """One batch in the writer thread: the jobs it touches, folded in memory, each written once.

    Rows are plain records (`job_record`: no ORM session, no instrumentation), read and written by
    the lean statements (app/_lean.py) in `conn`'s transaction.
    """

    def __init__(self, conn: Connection, lean: LeanStatements, cursor: DBAPICursor) -> None:
        self.conn = conn
        self.rows: dict[str, JobRow | None] = {}
        """Every job the batch touched, as the batch left it (None: absent or deleted)."""
        self.applied: list[Applied] = []
        self.observed: list[tuple[EventTimes, Event]] = []
        self.handoffs: dict[str, Handoff] = {}
        self.callbacks: set[str] = set()
        """Jobs whose attempt the batch ended and that have a callback URL."""
        self.pipelines_due: set[str] = set()
        """Pipelines whose next step may be due: a stage completed or waits, or the pipeline ended."""
        self._new: dict[str, JobRow] = {}
        self._dirty: dict[str, JobRow] = {}
        self._families: dict[str, Family] = {}
        """Batch parents this batch derived, with their children."""
        self._events: list[tuple[int, str, str, bytes]] = []
        self._lean, self._cursor = lean, cursor
        """The lean statements, and their cursor on `conn`'s transaction."""

    def load(self, job_ids: set[str]) -> None:
        """Read the jobs a batch touches, one query per 500 ids."""
        for chunk in _chunks(sorted(job_ids - self.rows.keys()), 500):
            for row in self._lean.select_jobs(self._cursor, chunk):
                self.rows[row.id] = row
        self.rows.update((job_id, None) for job_id in job_ids if job_id not in self.rows)

    def save(self, job: JobRow, new: bool) -> None:
        """Mark a job to be written at the next flush."""
        self.rows[job.id] = job
        if new:
            self._new[job.id] = job
        elif job.id not in self._new:
            self._dirty[job.id] = job

    def event(self, seq: int, job_id: str, kind: str, payload: bytes) -> None:
        """Record an event row, written at the next flush."""
        self._events.append((seq, job_id, kind, payload))

    def flush(self) -> None:
        """Write what the batch changed so far: each job row once, then the event rows."""
        if self._new:
            self._lean.insert_jobs(self._cursor, self._new.values())
        if self._dirty:
            self._lean.update_jobs(self._cursor, self._dirty.values())
        if self._events:
            self._lean.insert_events(self._cursor, self._events)
        self._new, self._dirty, self._events = {}, {}, []

    def move_bookmark(self, last: int) -> None:
        """Record `last` as the last sequence applied, in the batch's transaction."""
        self._lean.move_bookmark(self._cursor, BOOKMARK, last)

    def hand_off(self, job_ids: set[str]) -> None:
        """Keep the rows of the awaited jobs this batch touched (flushed before), with their queue
        position, so that whoever waits need not read them back."""
        jobs = [job for job_id in sorted(job_ids) if (job := self.rows.get(job_id)) is not None]
        positions = queue_positions(self.conn, jobs)
        self.handoffs.update((job.id, Handoff(job, positions[job.id])) for job in jobs)

    def delete(self, job: JobRow, seq: int) -> None:
        """Remove a job, its children and their events; followers get a last `deleted` event."""
        self.flush()  # so that the deletes below also cover what this batch wrote
        children = self.conn.execute(select(JOBS.c.id).where(JOBS.c.parent_id == job.id)).scalars()
        ids = [job.id, *children]
        self.conn.execute(delete(EVENTS).where(EVENTS.c.job_id.in_(ids)))
        self.conn.execute(delete(JOBS).where(JOBS.c.id.in_(ids)))
        for job_id in ids:
            self.rows[job_id] = None
        self._families.pop(job.id, None)
        payload = _envelope(job, seq, "deleted", job.attempt, utcnow(), b'{"kind":"deleted"}')
        self.applied += [
            Applied(seq, job_id, job.owner, "deleted", job.status, True, payload) for job_id in ids
        ]

    def _family(self, parent: JobRow) -> Family:
        """A parent's children, read once per batch (after writing what the batch changed)."""
        family = self._families.get(parent.id)
        if family is None:
            self.flush()  # so that children this batch created are read with the others
            pipeline = parent.pool == PIPELINE_POOL
            family = self._families[parent.id] = Family(pipeline)
            for row in self.conn.execute(_STAGES if pipeline else _CHILDREN, {"parent_id": parent.id}):
                family.set(row)
        return family

    def end_waiting_stages(self, pipeline: JobRow, seq: int, ts: datetime, reason: str) -> None:
        """Cancel a pipeline's waiting stages, in this transaction, as the pipeline ends: derived,
        like a parent's state, from the event that ended it (no event of their own, no race with a
        retry); their followers get a last `cancelled` event."""
        family = self._family(pipeline)
        waiting = {stage.id for stage in family.stages() if stage.status == WAITING}
        self.load(waiting)
        for stage_id in sorted(waiting):
            stage = self.rows[stage_id]
            if stage is None:
                continue
            stage.status, stage.current_step, stage.error = JobStatus.CANCELLED, "cancelled", reason
            stage.completed_at, stage.updated_at, stage.last_seq = ts, ts, seq
            self.save(stage, new=False)
            family.set(stage)
            raw = _encoder.encode(
                {"kind": "cancelled", "job_id": stage_id, "derived": True, "reason": reason}
            )
            payload = _envelope(stage, seq, "cancelled", stage.attempt, ts, raw)
            self.event(seq, stage_id, "cancelled", payload)
            self.applied.append(Applied(seq, stage_id, stage.owner, "cancelled", stage.status, True, payload))

    def derive_parent(self, child: JobRow, seq: int, ts: datetime, created: bool) -> Applied | None:
        """A batch parent's status, progress and result follow its children, derived after each
        child event from the event alone (its time, not the clock), so a database rebuilt from
        the stream derives the same rows and events however its batches fell. A child's creation
        moves the parent's counts without an event of its own."""
        assert child.parent_id is not None
        parent_id = child.parent_id
        self.load({parent_id})
        parent = self.rows[parent_id]
        if parent is None:
            return None
        family = self._family(parent)
        family.set(child)
        # Ended by its children, or explicitly (cancelled, force-completed): only a retry, which
        # resets it to pending, lets the children move it again.
        ended = JobStatus(parent.status).terminal
        count = len(family.children)
        if family.pipeline:
            planned = planned_types(parent.params)
            stages = in_plan(parent.id, planned, family.stages())
            derived = derive_pipeline(stages, family.nonzero_counts(), parent.queue_seq)
            if not ended and derived.status in TERMINAL_STATUSES:
                # It ends now, so its waiting stages never run: they end with it, here.
                self.end_waiting_stages(parent, seq, ts, f"the pipeline {derived.status}: {derived.error}")
                stages = in_plan(parent.id, planned, family.stages())
                derived = derive_pipeline(stages, family.nonzero_counts(), parent.queue_seq)
            elif child.status in (JobStatus.COMPLETED, WAITING):
                self.pipelines_due.add(parent_id)  # its next stage may be due
            count = len(stages)  # a stage not recorded yet counts, at 0: the plan says how many
        else:
            derived = family.derive(ended)
        result = derived.result
        status = JobStatus(parent.status) if ended or derived.status is None else derived.status
        before = (parent.status, parent.progress, parent.result)
        progress = family.progress(count)
        if status == parent.status and result == parent.result and abs(progress - parent.progress) < 1.0:
            progress = parent.progress  # a child's small step: the parent moves by whole points
        parent.result, parent.progress = result, progress
        parent.current_step = derived.step
        if status != parent.status:
            parent.status = status
            if status == JobStatus.RUNNING and parent.started_at is None:
                parent.started_at = ts
            if status.terminal and parent.completed_at is None:
                parent.completed_at = ts
            if status in (JobStatus.FAILED, JobStatus.CANCELLED) and derived.error is not None:
                parent.error = derived.error
        self.save(parent, new=False)
        unchanged = (parent.status, parent.progress, parent.result) == before
        if created or unchanged or JobStatus(before[0]).terminal:
            return None
        parent.last_seq, parent.updated_at = seq, ts
        kind = str(status) if status.terminal else "progress"
        raw = _encoder.encode(
            {"kind": kind, "job_id": parent_id, "derived": True, "counts": result["counts"]}
        )
        payload = _envelope(parent, seq, kind, parent.attempt, ts, raw)
        self.event(seq, parent_id, kind, payload)
        if status.terminal and parent.callback_url:
            self.callbacks.add(parent_id)
        return Applied(seq, parent_id, parent.owner, kind, parent.status, status.terminal, payload)


def write_batch(
    conn: Connection, decoded: list[tuple[Msg, int, Event]], last: int, advanced: bool, awaited: set[str]
) -> BatchWrites:
    """Apply a batch of decoded events in `conn`'s transaction, and with `advanced` (it applied
    something new) move the bookmark to `last`; keeps the rows of the `awaited` jobs it touched."""
    with lean_statements(conn, _MUTABLE) as (lean, cursor):
        return _write(BatchWrites(conn, lean, cursor), decoded, last, advanced, awaited)


def _write(
    writes: BatchWrites, decoded: list[tuple[Msg, int, Event]], last: int, advanced: bool, awaited: set[str]
) -> BatchWrites:
    conn = writes.conn
    # One query for every job the batch touches, not one per job.
    wanted = {e.job_id for _, _, e in decoded if not isinstance(e, FileStored | FileDeleted)}
    writes.load(wanted)
    for msg, seq, event in decoded:
        if isinstance(event, FileStored | FileDeleted):
            _apply_file(conn, event, seq)
            continue
        before = writes.rows[event.job_id]
        if isinstance(event, Deleted):
            if before is not None:
                writes.delete(before, seq)
            continue
        job, ends = fold(before, event, seq)
        if job is None:
            continue
        writes.observed.append((EventTimes(job.type, job.attempt, job.created_at, job.started_at), event))
        writes.save(job, new=before is None)
        payload = _envelope(job, seq, event.kind, event.attempt, event.ts, msg.data)
        writes.event(seq, job.id, event.kind, payload)
        # An event of a job that has ended (its webhook's result) closes a follower too: one
        # that read the history just before it was stored and the job just after waits for it.
        closes = ends or JobStatus(job.status).terminal
        writes.applied.append(Applied(seq, job.id, job.owner, event.kind, job.status, closes, payload))
        if ends and job.callback_url:
            writes.callbacks.add(job.id)
        if job.pool == PIPELINE_POOL and ends:  # cancelled, or completed by an admin
            writes.end_waiting_stages(job, seq, event.ts, f"the pipeline {job.status}")
        elif job.pool == PIPELINE_POOL:
            writes.pipelines_due.add(job.id)  # submitted (or retried): its first stage may be due
        if job.parent_id is not None:
            derived = writes.derive_parent(job, seq, event.ts, created=before is None)
            if derived is not None:
                writes.applied.append(derived)
    writes.flush()
    writes.hand_off(awaited)
    if advanced:
        writes.move_bookmark(last)
    return writes
