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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from app._batch import BOOKMARK, BatchWrites, Handoff, write_batch
from app._db import BookmarkRow, Database
from app._hub import Hub
from app._metrics import Metrics
from streams import (
    ALL_SUBJECTS,
    STREAM,
    Event,
    TaskSupervisor,
    decode_event,
    riding_out,
)

__all__ = ["Handoff", "Projection"]

log = logging.getLogger("jobcast.projection")

MAX_BATCH = 1000
NATS_PENDING_MSGS = 65_536
NATS_PENDING_BYTES = 64 * 2**20
"""nats-py's bounds of its queue in front of `_enqueue` (which empties it at once): what it drops
there its ordered consumer would never redeliver, so they must stay out of reach."""


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
        self.pipelines_due: set[str] = set()
        """Pipelines whose next step may be due (a stage completed or waits, or the pipeline
        ended); filled before the events are published, taken by the stage starter."""

    @property
    def queued(self) -> int:
        """Stream messages received but not yet applied."""
        return self._queue.qsize()

    async def start(self, js: JetStreamContext, tasks: TaskSupervisor) -> None:
        """Resume from the bookmark and follow the stream, as task `projection` of `tasks`."""
        self.applied_seq = await self._bookmark()

        async def stream_end() -> int:
            return await _last_stored(js, (await js.stream_info(STREAM)).state.last_seq)

        self.catch_up_to = await riding_out(f"the projection of {STREAM}", stream_end)
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
                self.pipelines_due |= writes.pipelines_due
                self.hub.publish_all(writes.applied)
                for job_id, handoff in writes.handoffs.items():
                    if job_id in self._expected:
                        self._expected[job_id] = handoff
                self._wake()
                self._mark_caught_up()
            if taken[-1] is None:  # the end of a subscription stopped at the bound
                return

    async def _apply(self, batch: list[Msg]) -> BatchWrites:
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

    def _write(self, decoded: list[tuple[Msg, int, Event]], last: int, awaited: set[str]) -> BatchWrites:
        """In the writer thread: apply a batch in one transaction, the bookmark with it."""
        with self.db.writer.begin() as conn:
            return write_batch(conn, decoded, last, last > self.applied_seq, awaited)

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.applied_seq:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _mark_caught_up(self) -> None:
        if not self.caught_up.is_set() and self.applied_seq >= self.catch_up_to:
            self.caught_up.set()
