"""The jobs table as a projection of the JOBS stream.

An ordered consumer delivers every message of the stream from the bookmark on; each
batch of events and the new bookmark are committed in one transaction, so applying
twice is harmless, a restarted API resumes where it stopped, and a deleted database
is rebuilt by replaying the stream. After commit, events go to the in-process hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any, cast

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection

from app._db import JOBS, BookmarkRow, Database, EventRow, FileRow, JobRow
from app._hub import Applied, Hub
from app._metrics import Metrics
from app._queue import queue_position
from app._schemas import EventEnvelope, QueuePosition
from streams import (
    ALL_SUBJECTS,
    STREAM,
    TERMINAL_STATUSES,
    CallbackResult,
    Cancelled,
    CancelRequested,
    Completed,
    Deleted,
    Event,
    Failed,
    FileDeleted,
    FileStored,
    JobStatus,
    Progress,
    Retrying,
    Started,
    Submitted,
    TaskSupervisor,
    decode_event,
    is_terminal,
    released_by_worker,
    utcnow,
)

log = logging.getLogger("jobcast.projection")

BOOKMARK = "jobs"
MAX_BATCH = 1000
NATS_PENDING_MSGS = 65_536
NATS_PENDING_BYTES = 64 * 2**20
"""nats-py's bounds of its queue in front of `_enqueue` (which empties it at once): what it drops
there its ordered consumer would never redeliver, so they must stay out of reach."""
_encoder = msgspec.json.Encoder()


def _envelope(job: JobRow, seq: int, kind: str, attempt: int, ts: datetime, raw: bytes) -> bytes:
    """The client-facing envelope: the job's state after the event, and the raw event."""
    return _encoder.encode(
        EventEnvelope(
            seq=seq, job_id=job.id, kind=kind, status=job.status, progress=job.progress,
            current_step=job.current_step, attempt=attempt, ts=ts, event=msgspec.Raw(raw),
        )
    )  # fmt: skip


def fold(job: JobRow | None, event: Event, seq: int) -> tuple[JobRow | None, bool]:
    """Apply one event to a job row (creating it for a submission).

    Returns the row and whether the event ended the job's current attempt. Events of an
    older attempt, and events after the end that no new submission preceded, are recorded
    but change nothing.
    """
    if isinstance(event, Submitted):
        return _submitted(job, event, seq), False
    if job is None:
        return None, False  # events of a job the projection never saw (deleted): nothing to update
    job.last_seq = seq
    if released_by_worker(event) and event.attempt >= job.attempt:
        job.held_by = None
    if isinstance(event, CallbackResult):
        if event.attempt == job.attempt:
            job.callback_status = "delivered" if event.delivered else "failed"
        return job, False
    finished = JobStatus(job.status).terminal
    if event.attempt < job.attempt or (finished and event.attempt == job.attempt):
        return job, False
    if finished and not isinstance(event, CancelRequested):
        # Only a new submission (a retry) reopens an ended job. A run that began before the end
        # was stored (a worker given the job again while its first runner, out of reach, still
        # ran it) ends nothing more: one end, and one webhook, per submission.
        return job, False
    match event:
        case Started():
            job.status, job.attempt, job.worker = JobStatus.RUNNING, event.attempt, event.worker
            job.held_by, job.started_at, job.progress, job.current_step = (
                event.worker,
                event.ts,
                0.0,
                "started",
            )
            job.error = job.completed_at = None
        case Progress():
            job.status, job.progress, job.current_step = JobStatus.RUNNING, event.progress, event.step
        case Retrying():
            job.status, job.attempt, job.error = JobStatus.RETRYING, event.attempt, event.error
            job.current_step = f"retrying in {event.delay_s:.1f} s: {event.error}"
        case CancelRequested():
            job.current_step = "cancel requested"
        case Completed():
            job.status, job.result, job.progress = JobStatus.COMPLETED, event.result, 100.0
            job.current_step = "completed"
        case Failed():
            job.status, job.error, job.current_step = JobStatus.FAILED, event.error, "failed"
            job.exhausted = event.exhausted
        case Cancelled():
            job.status, job.current_step = JobStatus.CANCELLED, "cancelled"
            job.error = event.reason or None
        case _:
            return job, False
    if is_terminal(event):
        job.attempt, job.completed_at = max(job.attempt, event.attempt), event.ts
    job.updated_at = event.ts
    return job, is_terminal(event)


def _submitted(job: JobRow | None, event: Submitted, seq: int) -> JobRow | None:
    scheduled = event.scheduled_for is not None and event.scheduled_for > event.ts
    if job is None and event.attempt > 1:
        # A retry of a job this projection does not have: it was deleted (its first submission
        # purged) after whoever retried it last looked. A job comes into being only by its first.
        return None
    if job is None:
        job = JobRow(
            id=event.job_id, type=event.type, pool=event.pool, owner=event.owner, title=event.title,
            description=event.description, params=event.params, file_id=event.file_id,
            parent_id=event.parent_id, max_attempts=event.max_attempts, timeout_s=event.timeout_s,
            priority=event.priority, submit_seq=seq, created_at=event.created_at, result=None, error=None,
            worker=None, held_by=None, exhausted=False, client_request_id=event.client_request_id,
            scheduled_for=event.scheduled_for, callback_url=event.callback_url, file_name=event.file_name,
            callback_status="pending" if event.callback_url else None, started_at=None, completed_at=None,
        )  # fmt: skip
    elif event.attempt < job.attempt or (event.attempt == job.attempt and job.status != JobStatus.SCHEDULED):
        # A duplicate, or a scheduled submission the server has just released for an
        # attempt that already ended (e.g. cancelled while it waited).
        job.last_seq = seq
        return job
    if job.status == JobStatus.SCHEDULED and event.attempt == job.attempt:
        scheduled = False  # the stream released it: it is due now
    job.status = JobStatus.SCHEDULED if scheduled else JobStatus.PENDING
    job.attempt = event.attempt
    job.progress = 0.0
    job.current_step = f"scheduled for {event.scheduled_for:%Y-%m-%d %H:%M:%S} UTC" if scheduled else "queued"
    job.result = job.error = job.completed_at = None
    job.exhausted = False
    job.queue_seq = seq
    job.last_seq, job.updated_at = seq, event.ts
    return job


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """`items` in lists of at most `size` (SQLite bounds the parameters of one statement)."""
    return [items[start : start + size] for start in range(0, len(items), size)]


_EVENTS = cast(Table, EventRow.__table__)
_FILES = cast(Table, FileRow.__table__)
BOOKMARKS = cast(Table, BookmarkRow.__table__)
_JOB_COLUMNS = tuple(column.name for column in JOBS.columns)
_MUTABLE = (
    "status", "attempt", "progress", "current_step", "result", "error", "worker", "held_by", "exhausted",
    "callback_status", "queue_seq", "last_seq", "started_at", "completed_at", "updated_at",
)  # fmt: skip
"""The columns `fold` and the parent derivation change; a job's spec never changes."""
_CHILDREN = select(JOBS.c.id, JOBS.c.status, JOBS.c.progress, JOBS.c.submit_seq).where(
    JOBS.c.parent_id == bindparam("parent_id")
)
_INSERT_JOB = insert(JOBS)
_UPDATE_JOB = update(JOBS).where(JOBS.c.id == bindparam("_id"))
_INSERT_EVENT = insert(_EVENTS)
_UPDATE_BOOKMARK = update(BOOKMARKS).where(BOOKMARKS.c.name == bindparam("_name"))


@dataclass(frozen=True, slots=True)
class Handoff:
    """A job as the batch that applied a waited-for sequence left it, for the waiter's answer."""

    row: JobRow
    position: QueuePosition | None
    """Its queue position, counted in the batch's transaction."""


@dataclass(frozen=True, slots=True)
class _Times:
    """What the metrics need of a job at the moment an event was applied to it."""

    type: str
    attempt: int
    created_at: datetime
    started_at: datetime | None


def _apply_file(conn: Connection, event: FileStored | FileDeleted, seq: int) -> None:
    if isinstance(event, FileDeleted):
        conn.execute(delete(_FILES).where(_FILES.c.id == event.file_id))
    elif conn.execute(select(_FILES.c.id).where(_FILES.c.id == event.file_id)).first() is not None:
        # Stored again: moved to its own subject before its job's were purged (app/_retention.py);
        # the row takes the new message's place, as a rebuild would.
        conn.execute(update(_FILES).where(_FILES.c.id == event.file_id).values(seq=seq))
    else:
        conn.execute(
            insert(_FILES),
            {
                "id": event.file_id, "owner": event.owner, "name": event.name,
                "content_type": event.content_type, "size": event.size, "sha256": event.sha256,
                "job_id": event.job_id or None, "seq": seq, "created_at": event.ts,
            },
        )  # fmt: skip


class _Writes:
    """One batch in the writer thread: the jobs it touches, folded in memory, each written once.

    Rows are plain (session-less) `JobRow`s, written with Core `executemany` statements.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.rows: dict[str, JobRow | None] = {}
        """Every job the batch touched, as the batch left it (None: absent or deleted)."""
        self.applied: list[Applied] = []
        self.observed: list[tuple[_Times, Event]] = []
        self.handoffs: dict[str, Handoff] = {}
        self.callbacks: set[str] = set()
        """Jobs whose attempt the batch ended and that have a callback URL."""
        self._new: dict[str, JobRow] = {}
        self._dirty: dict[str, JobRow] = {}
        self._families: dict[str, _Family] = {}
        """Batch parents this batch derived, with their children."""
        self._events: list[dict[str, Any]] = []

    def load(self, job_ids: set[str]) -> None:
        """Read the jobs a batch touches, one query per 500 ids."""
        for chunk in _chunks(sorted(job_ids - self.rows.keys()), 500):
            for row in self.conn.execute(select(JOBS).where(JOBS.c.id.in_(chunk))):
                self.rows[row.id] = JobRow(**row._mapping)
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
        self._events.append({"seq": seq, "job_id": job_id, "kind": kind, "payload": payload})

    def flush(self) -> None:
        """Write what the batch changed so far: each job row once, then the event rows."""
        if self._new:
            self.conn.execute(
                _INSERT_JOB, [{c: getattr(job, c) for c in _JOB_COLUMNS} for job in self._new.values()]
            )
        if self._dirty:
            self.conn.execute(
                _UPDATE_JOB,
                [{"_id": job.id} | {c: getattr(job, c) for c in _MUTABLE} for job in self._dirty.values()],
            )
        if self._events:
            self.conn.execute(_INSERT_EVENT, self._events)
        self._new, self._dirty, self._events = {}, {}, []

    def hand_off(self, job_ids: set[str]) -> None:
        """Keep the rows of the awaited jobs this batch touched (flushed before), with their queue
        position, so that whoever waits need not read them back."""
        for job_id in job_ids:
            if (job := self.rows.get(job_id)) is not None:
                self.handoffs[job_id] = Handoff(job, queue_position(self.conn, job))

    def delete(self, job: JobRow, seq: int) -> None:
        """Remove a job, its children and their events; followers get a last `deleted` event."""
        self.flush()  # so that the deletes below also cover what this batch wrote
        children = self.conn.execute(select(JOBS.c.id).where(JOBS.c.parent_id == job.id)).scalars()
        ids = [job.id, *children]
        self.conn.execute(delete(_EVENTS).where(_EVENTS.c.job_id.in_(ids)))
        self.conn.execute(delete(JOBS).where(JOBS.c.id.in_(ids)))
        for job_id in ids:
            self.rows[job_id] = None
        self._families.pop(job.id, None)
        payload = _envelope(job, seq, "deleted", job.attempt, utcnow(), b'{"kind":"deleted"}')
        self.applied += [
            Applied(seq, job_id, job.owner, "deleted", job.status, True, payload) for job_id in ids
        ]

    def _family(self, parent_id: str) -> _Family:
        """A batch parent's children, read once per batch (after writing what the batch changed)."""
        family = self._families.get(parent_id)
        if family is None:
            self.flush()  # so that children this batch created are read with the others
            family = self._families[parent_id] = _Family()
            for row in self.conn.execute(_CHILDREN, {"parent_id": parent_id}):
                family.set(row.id, row.status, row.progress, row.submit_seq)
        return family

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
        family = self._family(parent_id)
        family.set(child.id, child.status, child.progress, child.submit_seq)
        counts, total = family.counts, len(family.children)
        done = sum(counts[s] for s in TERMINAL_STATUSES)
        result: dict[str, object] = {"total": total, "counts": {s: n for s, n in sorted(counts.items()) if n}}
        if JobStatus(parent.status).terminal:
            # Ended by its children, or explicitly (cancelled, force-completed): only a retry,
            # which resets it to pending, lets the children move it again.
            status = JobStatus(parent.status)
        elif done == total:
            status = JobStatus.COMPLETED if counts[JobStatus.COMPLETED] == total else JobStatus.FAILED
            ordered = family.in_submit_order()
            for outcome in sorted(TERMINAL_STATUSES):
                result[str(outcome)] = [cid for cid, s in ordered if s == outcome]
        elif counts[JobStatus.PENDING] + counts[JobStatus.SCHEDULED] == total:
            status = JobStatus(parent.status)
        else:
            status = JobStatus.RUNNING
        before = (parent.status, parent.progress, parent.result)
        progress = family.progress()
        if status == parent.status and result == parent.result and abs(progress - parent.progress) < 1.0:
            progress = parent.progress  # a child's small step: the parent moves by whole points
        parent.result, parent.progress = result, progress
        parent.current_step = f"{done} of {total} done"
        if status != parent.status:
            parent.status = status
            if status == JobStatus.RUNNING and parent.started_at is None:
                parent.started_at = ts
            if status.terminal and parent.completed_at is None:
                parent.completed_at = ts
            if status == JobStatus.FAILED:
                parent.error = f"{total - counts[JobStatus.COMPLETED]} of {total} children did not complete"
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


class _Family:
    """A batch parent's children as far as its derivation needs them, with the status counts and
    the progress total kept up to date child by child; the total is exact (a Fraction), so the
    parent's progress never depends on the order its children were added in."""

    def __init__(self) -> None:
        self.children: dict[str, tuple[str, int]] = {}
        """Each child's status and submit sequence."""
        self.counts: Counter[str] = Counter()
        self._progress: dict[str, Fraction] = {}
        self._total = Fraction(0)

    def set(self, child_id: str, status: str, progress: float, submit_seq: int) -> None:
        """Record a child's state, replacing what was known of it."""
        if (old := self.children.get(child_id)) is not None:
            self.counts[old[0]] -= 1
            self._total -= self._progress[child_id]
        weight = Fraction(100) if JobStatus(status).terminal else Fraction(progress)
        self.children[child_id], self._progress[child_id] = (status, submit_seq), weight
        self.counts[status] += 1
        self._total += weight

    def progress(self) -> float:
        """The mean of the children's progress, a finished child counting 100."""
        return round(float(self._total / len(self.children)), 2) if self.children else 0.0

    def in_submit_order(self) -> list[tuple[str, str]]:
        """(child id, status) in the order the children were submitted."""
        return [(cid, status) for cid, (status, _) in sorted(self.children.items(), key=lambda i: i[1][1])]


async def _last_stored(js: JetStreamContext, last_seq: int) -> int:
    """The sequence of the stream's newest message still stored: `last_seq` unless that message
    was purged or expired (a tombstone's TTL), which the ordered consumer would never deliver."""
    if last_seq == 0:
        return 0
    try:
        return (await js.get_last_msg(STREAM, ALL_SUBJECTS, direct=True)).seq or 0
    except NotFoundError:
        return 0  # nothing stored any more


class Projection:
    """Applies the JOBS stream to SQLite and wakes whoever waits on it."""

    def __init__(
        self,
        db: Database,
        hub: Hub,
        metrics: Metrics | None = None,
        queue_limit: int = 10_000,
        queue_bytes_limit: int = 32 * 2**20,
    ) -> None:
        self.db = db
        self.hub = hub
        self.metrics = metrics or Metrics()
        self.queue_limit = queue_limit
        """Messages received but not yet applied, at most (JOBCAST_PROJECTION_QUEUE)."""
        self.queue_bytes_limit = queue_bytes_limit
        """Their payload bytes, at most (JOBCAST_PROJECTION_QUEUE_MB)."""
        self.queued_bytes = 0
        self.resubscribes = 0
        """Times a subscription was stopped at the bound (or after a gap) and a new one started."""
        self.applied_seq = 0
        self.caught_up = asyncio.Event()
        """Set once everything in the stream at start-up has been applied."""
        self.catch_up_to = 0
        """The stream's last sequence when the projection started."""
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        """Bounded by `_enqueue`; None marks the end of a subscription stopped at the bound."""
        self._consumer_seq = self._last_queued = 0
        self._stopping: asyncio.Task[None] | None = None
        """Unsubscribing the subscription that filled the queue."""
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._expected: dict[str, Handoff | None] = {}
        """Jobs someone is about to wait for, and the latest state a batch left each in."""
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection")
        """SQLite's one writer: a batch is one hop to this thread and one transaction."""
        self._counter = itertools.count()
        self._sub: NatsSubscription | None = None
        self._generation = 0
        """Which subscription feeds the queue; messages of an older one are dropped."""
        self.callbacks_due: set[str] = set()
        """Jobs with a callback URL whose attempt has just ended; filled before their terminal
        event is published, taken by the webhooks (the others need no look at the job)."""

    @property
    def queued(self) -> int:
        """Stream messages received but not yet applied."""
        return self._queue.qsize()

    async def start(self, js: JetStreamContext, tasks: TaskSupervisor) -> None:
        """Resume from the bookmark and follow the stream, as task `projection` of `tasks`."""
        self.applied_seq = await self._bookmark()
        info = await js.stream_info(STREAM)
        self.catch_up_to = await _last_stored(js, info.state.last_seq)
        if self.applied_seq > self.catch_up_to:
            log.warning(
                "database bookmark %d is ahead of the stream (%d): was the NATS store replaced?",
                self.applied_seq, self.catch_up_to,
            )  # fmt: skip
        self._mark_caught_up()
        tasks.start("projection", lambda: self._follow(js))
        log.info("projection resumes after seq %d; stream is at %d", self.applied_seq, self.catch_up_to)

    async def stop(self) -> None:
        """Release the waiters and the writer, once `tasks` has stopped the loop; what was
        applied stays applied."""
        for *_, future in self._waiters:
            future.cancel()
        self._writer.shutdown(wait=True)  # a batch in flight finishes before the engine goes

    async def _bookmark(self) -> int:
        async with self.db.session() as session:
            bookmark = await session.get(BookmarkRow, BOOKMARK)
            return bookmark.last_seq if bookmark else 0

    async def _follow(self, js: JetStreamContext) -> None:
        """Subscribe from the bookmark and apply until something fails; the supervisor runs it
        again, and nothing is skipped or applied twice across that restart. A subscription that
        fills the queue is stopped, and the next one starts once what it queued is applied."""
        while True:
            # A batch that failed after its commit is in SQLite already: SQLite's bookmark, not
            # the sequence held in memory, says where to resume.
            self.applied_seq = max(self.applied_seq, await self._bookmark())
            self._wake()
            info = await js.stream_info(STREAM)
            # What an earlier subscription queued (or still delivers) comes again from the new one.
            self._generation += 1
            generation = self._generation
            while not self._queue.empty():
                self._queue.get_nowait()
            self.queued_bytes = self._consumer_seq = 0

            async def deliver(msg: Msg, generation: int = generation) -> None:
                if generation == self._generation:
                    await self._enqueue(msg)

            start = max(self.applied_seq + 1, info.state.first_seq or 1)
            self._sub = await js.subscribe(
                ALL_SUBJECTS,
                ordered_consumer=True,
                cb=deliver,
                config=js_api.ConsumerConfig(
                    deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                ),
                # `_enqueue` never waits, so nats-py's own queue only holds what its read loop
                # parsed since it last yielded (a socket read or two); these are never reached.
                pending_msgs_limit=NATS_PENDING_MSGS,
                pending_bytes_limit=NATS_PENDING_BYTES,
                # nats-py resets an ordered consumer after two missed heartbeats; its default of 5 s
                # left the projection (and every submit) stalled ~18 s after a broker restart.
                idle_heartbeat=1.0,
            )
            try:
                await self._run()  # returns once it has applied all that a stopped subscription queued
            finally:
                sub, self._sub = self._sub, None
                stopping, self._stopping = self._stopping, None
                if stopping is not None:
                    await stopping
                else:
                    await self._unsubscribe(sub)

    async def _unsubscribe(self, sub: NatsSubscription | None) -> None:
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may already be gone
                log.debug("unsubscribe: %s", exc)

    @contextlib.contextmanager
    def expecting(self, job_id: str) -> Iterator[None]:
        """Keep `job_id`'s state as batches apply it while the block runs (see `wait_for`).
        Entered before publishing: the projection may apply the event before its ack arrives."""
        self._expected[job_id] = None
        try:
            yield
        finally:
            self._expected.pop(job_id, None)

    async def wait_for(self, seq: int, timeout: float, job_id: str | None = None) -> Handoff | None:
        """Return once `seq` has been applied; raises TimeoutError.

        Inside `expecting(job_id)`, returns the job as the latest batch that applied `seq` or a
        later event of it left it, so the caller need not read it back; None otherwise.
        """
        if seq > self.applied_seq:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (seq, next(self._counter), future))
            async with asyncio.timeout(timeout):
                await future
        handoff = self._expected.get(job_id) if job_id is not None else None
        return handoff if handoff is not None and handoff.row.last_seq >= seq else None

    async def _enqueue(self, msg: Msg) -> None:
        # Never waits. When nats-py's queue for a callback is full it drops the message, and its
        # ordered consumer does not notice (it tracks what arrived, not what was handed over): those
        # events would be skipped for good. So the bound is kept here: past it, or after a gap in
        # the consumer's sequence, this subscription is stopped at once, and `_follow` starts a new
        # one after the last message queued, once `_run` has applied everything before it.
        seq = msg.metadata.sequence
        gap = seq.consumer != 1 and seq.consumer != self._consumer_seq + 1  # 1: nats-py restarted it
        if gap or self._queue.qsize() >= self.queue_limit or self.queued_bytes >= self.queue_bytes_limit:
            log.log(
                logging.WARNING if gap else logging.INFO,  # a full queue is routine while catching up
                "projection %s at seq %d: stopping its consumer, resuming after seq %d once applied",
                "missed messages" if gap else "queue full", seq.stream, self._last_queued,
            )  # fmt: skip
            self.resubscribes += 1
            self._generation += 1  # what this subscription still delivers is dropped
            self._stopping = asyncio.create_task(self._unsubscribe(self._sub))
            self._queue.put_nowait(None)
            return
        self._consumer_seq, self._last_queued = seq.consumer, seq.stream
        self.queued_bytes += len(msg.data)
        self._queue.put_nowait(msg)

    async def _run(self) -> None:
        while True:
            taken = [await self._queue.get()]
            while len(taken) < MAX_BATCH and not self._queue.empty():
                taken.append(self._queue.get_nowait())
            batch = [msg for msg in taken if msg is not None]
            self.queued_bytes -= sum(len(msg.data) for msg in batch)
            if batch:
                # Any failure (a full disk, a locked file, a bug) ends the loop; its supervisor
                # logs it, reports it on /ready and resumes from the bookmark after a backoff.
                writes = await self._apply(batch)
                self.callbacks_due |= writes.callbacks
                self.hub.publish_all(writes.applied)
                for job_id, handoff in writes.handoffs.items():
                    if job_id in self._expected:
                        self._expected[job_id] = handoff
                self._wake()
                self._mark_caught_up()
            if taken[-1] is None:  # the end of a subscription stopped at the bound
                return

    async def _apply(self, batch: list[Msg]) -> _Writes:
        last = self.applied_seq
        decoded: list[tuple[Msg, int, Event]] = []
        for msg in batch:
            seq = msg.metadata.sequence.stream
            if seq <= last:
                continue
            last = seq
            try:
                decoded.append((msg, seq, decode_event(msg.data)))
            except msgspec.MsgspecError as exc:
                log.warning("seq %d on %s is not a jobcast event: %s", seq, msg.subject, exc)
        awaited = set(self._expected)
        loop = asyncio.get_running_loop()
        writes = await loop.run_in_executor(self._writer, self._write, decoded, last, awaited)
        for times, event in writes.observed:  # after commit: a retried batch counts once
            self.metrics.observe(times, event)
        self.applied_seq = last
        return writes

    def _write(self, decoded: list[tuple[Msg, int, Event]], last: int, awaited: set[str]) -> _Writes:
        """In the writer thread: apply a batch in one transaction, the bookmark with it."""
        with self.db.writer.begin() as conn:
            writes = _Writes(conn)
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
                writes.observed.append((_Times(job.type, job.attempt, job.created_at, job.started_at), event))
                writes.save(job, new=before is None)
                payload = _envelope(job, seq, event.kind, event.attempt, event.ts, msg.data)
                writes.event(seq, job.id, event.kind, payload)
                # An event of a job that has ended (its webhook's result) closes a follower too: one
                # that read the history just before it was stored and the job just after waits for it.
                closes = ends or JobStatus(job.status).terminal
                writes.applied.append(
                    Applied(seq, job.id, job.owner, event.kind, job.status, closes, payload)
                )
                if ends and job.callback_url:
                    writes.callbacks.add(job.id)
                if job.parent_id is not None:
                    derived = writes.derive_parent(job, seq, event.ts, created=before is None)
                    if derived is not None:
                        writes.applied.append(derived)
            writes.flush()
            writes.hand_off(awaited)
            bookmark = {"_name": BOOKMARK, "last_seq": last}
            if last > self.applied_seq and conn.execute(_UPDATE_BOOKMARK, bookmark).rowcount == 0:
                conn.execute(insert(BOOKMARKS), {"name": BOOKMARK, "last_seq": last})
        return writes

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.applied_seq:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _mark_caught_up(self) -> None:
        if not self.caught_up.is_set() and self.applied_seq >= self.catch_up_to:
            self.caught_up.set()
