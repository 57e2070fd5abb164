"""In-process fan-out of applied events to SSE, WebSocket and long-poll subscribers."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Applied:
    """An event the projection committed, with the job's state after it."""

    seq: int
    job_id: str
    owner: str
    kind: str
    status: str
    ends: bool
    """True for the event that ended the job's current attempt (completed / failed / cancelled)."""
    payload: bytes
    """The EventEnvelope, JSON-encoded once for every subscriber."""


def sse_frame(seq: int, kind: str, payload: bytes) -> bytes:
    """One SSE message: id = stream sequence, event = kind, data = the envelope (JSON: one line)."""
    return b"id: %d\r\nevent: %b\r\ndata: %b\r\n\r\n" % (seq, kind.encode(), payload)


class Target(Protocol):
    """Anything the hub hands events to: a queued Subscription, or an SSE follower that writes at once."""

    def deliver(self, item: Applied, frame: bytes) -> None:
        """Take one event; `frame` is its SSE message, encoded once for every follower. Never blocks."""


@dataclass(eq=False)
class Subscription:
    """A subscriber's queue and what it listens to."""

    hub: Hub
    job_ids: set[str] = field(default_factory=set)
    owner: str | None = None
    """Set to receive every job of this owner."""
    queue: asyncio.Queue[Applied] = field(default_factory=asyncio.Queue)

    def deliver(self, item: Applied, frame: bytes) -> None:
        """Queue one event for the subscriber's task (`frame`, its SSE encoding, is not needed here)."""
        self.queue.put_nowait(item)

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
        """Unregister everywhere."""
        self.remove_jobs(list(self.job_ids))
        self.follow_owner(None)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Hub:
    """Routes each applied event to the subscribers of its job and of its owner."""

    def __init__(self) -> None:
        self._by_job: defaultdict[str, set[Target]] = defaultdict(set)
        self._by_owner: defaultdict[str, set[Target]] = defaultdict(set)
        self.listeners: list[Callable[[Applied], None]] = []
        """Called with every applied event (e.g. the webhook sender); must not block."""

    def subscribe(self, job_ids: list[str] | None = None, owner: str | None = None) -> Subscription:
        """A new subscription; use it as a context manager so it is always closed."""
        sub = Subscription(self)
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
        """Hand `item` to every interested subscriber (no awaits: one pass, no coroutine switch)."""
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
