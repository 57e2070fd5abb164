"""In-process fan-out of applied events to SSE, WebSocket and long-poll subscribers."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from app._exceptions import TooSlowError


@dataclass(frozen=True, slots=True)
class Applied:
    """An event the projection committed, with the job's state after it."""

    seq: int
    job_id: str
    owner: str
    kind: str
    status: str
    ends: bool
    """True for the event that ended the job's current attempt (completed / failed / cancelled),
    and for any later one while the job stays ended (a webhook's result): followers stop after it."""
    payload: bytes
    """The EventEnvelope, JSON-encoded once for every subscriber."""


def sse_frame(seq: int, kind: str, payload: bytes) -> bytes:
    """One SSE message: id = stream sequence, event = kind, data = the envelope (JSON: one line)."""
    return b"id: %d\r\nevent: %b\r\ndata: %b\r\n\r\n" % (seq, kind.encode(), payload)


class Target(Protocol):
    """Anything the hub hands events to: a queued Subscription, or an SSE follower's outbox."""

    def deliver(self, item: Applied, frame: bytes) -> None:
        """Take one event; `frame` is its SSE message, encoded once for every follower. Never blocks."""


DEFAULT_CLIENT_BUFFER = 1024 * 1024
"""Bytes of events one client may have waiting (JOBCAST_CLIENT_BUFFER_KB sets the API's)."""


@dataclass(eq=False)
class Subscription:
    """A subscriber's bounded queue and what it listens to.

    Events wait here until the subscriber's task takes them. A subscriber that still has more than
    `limit` bytes waiting when the next batch of events arrives is cut off: what waits is dropped,
    `resume_after` says up to where it got everything, and `get` raises TooSlowError from then on.
    So it holds at most `limit` bytes plus one batch.
    """

    hub: Hub
    limit: int = DEFAULT_CLIENT_BUFFER
    job_ids: set[str] = field(default_factory=set)
    owner: str | None = None
    """Set to receive every job of this owner."""
    pending: deque[Applied] = field(default_factory=deque)
    queued: int = 0
    """Payload bytes in `pending`."""
    resume_after: int | None = None
    """Set once cut off: every event up to this sequence was taken by the subscriber."""
    cut_off: asyncio.Future[None] | None = None
    """Completed when the subscriber is cut off, for a task that waits on something else (a socket)."""
    batch: int = 0
    """The hub's batch this subscriber last got events of."""
    _wake: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    def deliver(self, item: Applied, frame: bytes) -> None:
        """Queue one event for the subscriber's task (`frame`, its SSE encoding, is not needed here)."""
        if self.resume_after is not None:
            return
        if self.batch != self.hub.batch:  # a new batch: did the subscriber take the earlier ones?
            self.batch = self.hub.batch
            if self.queued > self.limit:
                # Events of one sequence (a child's and its batch parent's) are resent rather than split.
                self._cut(self.pending[0].seq - 1)
                return
        size = len(item.payload)
        self.pending.append(item)
        self.queued += size
        self.hub.buffered += size
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def get(self) -> Applied:
        """The next event, waiting for one; raises TooSlowError once the subscriber is cut off."""
        while not self.pending:
            if self.resume_after is not None:
                raise TooSlowError(self.resume_after)
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        item = self.pending.popleft()
        size = len(item.payload)
        self.queued -= size
        self.hub.buffered -= size
        return item

    def _cut(self, resume_after: int) -> None:
        self.hub.buffered -= self.queued
        self.hub.cut_offs += 1
        self.pending.clear()
        self.queued = 0
        self.resume_after = resume_after
        for future in (self._wake, self.cut_off):
            if future is not None and not future.done():
                future.set_result(None)
        # Still registered (the hub may be iterating over this very set); ignores events until closed.

    def add_jobs(self, job_ids: list[str]) -> None:
        """Start receiving these jobs' events."""
        for job_id in job_ids:
            self.job_ids.add(job_id)
            self.hub._by_job[job_id].add(self)

    def remove_jobs(self, job_ids: list[str]) -> None:
        """Stop receiving these jobs' events."""
        for job_id in job_ids:
            self.job_ids.discard(job_id)
            self.hub._discard(self.hub._by_job, job_id, self)

    def follow_owner(self, owner: str | None) -> None:
        """Receive (or, with None, stop receiving) every job of `owner`."""
        if self.owner is not None:
            self.hub._discard(self.hub._by_owner, self.owner, self)
        self.owner = owner
        if owner is not None:
            self.hub._by_owner[owner].add(self)

    def close(self) -> None:
        """Unregister everywhere and drop what waits."""
        self.remove_jobs(list(self.job_ids))
        self.follow_owner(None)
        self.hub.buffered -= self.queued
        self.pending.clear()
        self.queued = 0

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Hub:
    """Routes each applied event to the subscribers of its job and of its owner."""

    def __init__(self, client_buffer: int = DEFAULT_CLIENT_BUFFER) -> None:
        self._by_job: defaultdict[str, set[Target]] = defaultdict(set)
        self._by_owner: defaultdict[str, set[Target]] = defaultdict(set)
        self.listeners: list[Callable[[Applied], None]] = []
        """Called with every applied event (e.g. the webhook sender); must not block."""
        self.client_buffer = client_buffer
        """The most bytes of events one subscriber or SSE follower may have waiting."""
        self.buffered = 0
        """Bytes of events waiting for their subscribers and followers, all of them together."""
        self.cut_offs = 0
        """Subscribers and followers cut off for falling too far behind, since start."""
        self.batch = 0
        """Counts the batches published, so a subscriber sees where one begins."""

    def subscribe(self, job_ids: list[str] | None = None, owner: str | None = None) -> Subscription:
        """A new subscription; use it as a context manager so it is always closed."""
        sub = Subscription(self, self.client_buffer)
        sub.add_jobs(job_ids or [])
        sub.follow_owner(owner)
        return sub

    def add_target(self, job_id: str, target: Target) -> None:
        """Hand `target` the events of `job_id` (for followers that are not Subscriptions)."""
        self._by_job[job_id].add(target)

    def remove_target(self, job_id: str, target: Target) -> None:
        """Stop handing `target` the events of `job_id`; idempotent."""
        self._discard(self._by_job, job_id, target)

    def publish(self, item: Applied) -> None:
        """Hand one event to every interested subscriber (a batch of its own)."""
        self.publish_all((item,))

    def publish_all(self, items: Iterable[Applied]) -> None:
        """Hand a committed batch's events to every interested subscriber (no awaits: one pass, no
        coroutine switch). A subscriber's backlog is held against its bound as each batch begins,
        so one large batch never cuts off a client that keeps up."""
        self.batch += 1
        for item in items:
            for listener in self.listeners:
                listener(item)
            targets = self._by_job.get(item.job_id)
            owners = self._by_owner.get(item.owner)
            if owners:
                targets = (targets | owners) if targets else owners
            if targets:
                # Encoded once here, not once per follower.
                frame = sse_frame(item.seq, item.kind, item.payload)
                for target in targets:
                    target.deliver(item, frame)

    @property
    def subscriber_count(self) -> int:
        """Distinct open subscriptions."""
        subs: set[Target] = set()
        for group in (*self._by_job.values(), *self._by_owner.values()):
            subs |= group
        return len(subs)

    @staticmethod
    def _discard(index: defaultdict[str, set[Target]], key: str, sub: Target) -> None:
        group = index.get(key)
        if group is not None:
            group.discard(sub)
            if not group:
                del index[key]
