"""When a pending job starts (`estimated_start_s`): the work ahead of it in its pool at the learned
speeds, spread over the pool's live slots.

The learned speeds (the workers' JOBCAST_SPEEDS bucket) and the live workers (their heartbeats) are
kept in memory by one supervised KV watch each (task `eta-watch`), so a job GET reads a small dict
and at most one indexed statement, never NATS. Running jobs' seconds left are their rows' `eta_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app._db import JOBS, JobRow
from app._queue import IN_QUEUE, WAITING
from app._schemas import QueuePosition
from app._watch import follow_bucket
from streams import (
    SPEED_PARAMS,
    JobStatus,
    Speed,
    TaskSupervisor,
    WorkerInfo,
    existing_speeds_bucket,
    existing_workers_bucket,
    is_unit_operation,
    speed_family,
    speed_key,
    worker_ttl,
)

MAX_AHEAD = 200
"""A job with more than this many ahead of it gets no estimate: reading that much of the queue
on every GET would cost more than the figure is worth."""
BUCKET_WAIT_S = 0.5
"""How soon the watch first looks again for the buckets before a worker has created them."""
BUCKET_WAIT_MAX_S = 5.0
"""The longest wait between looks: the wait doubles up to it while no worker has started."""


def eta_now(eta_s: float | None, said_at: datetime | None, now: datetime) -> float | None:
    """A running job's seconds left now: its last progress event's `eta_s`, less the time since
    that event (`said_at`, the row's updated_at), never below 0."""
    if eta_s is None or said_at is None:
        return eta_s
    return round(max(0.0, eta_s - max(0.0, (now - said_at).total_seconds())), 1)


def estimated_start(running_left: Iterable[float], slots: int, ahead: Iterable[float]) -> float | None:
    """Seconds until a slot is free for the job after `ahead` (each a job's expected seconds, in
    the order workers take them), when `running_left` are the seconds left of the running jobs and
    `slots` run at once: each job goes to the slot free first. None without a slot."""
    if slots <= 0:
        return None
    running = list(running_left)
    idle = [0.0] * max(0, slots - len(running))  # free now
    free = sorted(running + idle)[:slots]
    heapq.heapify(free)
    for seconds in ahead:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return round(free[0], 1)


class EtaBoard:
    """The learned speeds and the live workers, as their KV watches last said."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.speeds: dict[str, Speed] = {}
        """Learned speed by streams.speed_key."""
        self.workers: dict[str, WorkerInfo] = {}
        """Heartbeats by worker key; an expired one is dropped at the next change of the bucket (and
        `slots` skips it meanwhile)."""

    def start(self, tasks: TaskSupervisor) -> None:
        """Follow both buckets for as long as `tasks` runs (task `eta-watch`)."""
        tasks.start("eta-watch", self._watch)

    async def _watch(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow(existing_speeds_bucket, self.speeds, Speed))
            group.create_task(self._follow(existing_workers_bucket, self.workers, WorkerInfo))

    async def _follow(
        self,
        bucket: Callable[[JetStreamContext], Any],
        into: dict[str, Any],
        kind: type[Speed] | type[WorkerInfo],
    ) -> None:
        """Keep `into` equal to the bucket's values, once a worker has created the bucket."""
        kv: KeyValue | None = await bucket(self.js)
        wait_s = BUCKET_WAIT_S
        while kv is None:
            await asyncio.sleep(wait_s)
            wait_s = min(BUCKET_WAIT_MAX_S, 2 * wait_s)
            kv = await bucket(self.js)
        replayed: set[str] | None = set()  # the replay's keys; None once it is in (not kept growing)

        def loaded() -> None:
            nonlocal replayed
            # Run again after a failure: a key the replay did not bring is gone from the bucket.
            for gone in into.keys() - (replayed or set()):
                del into[gone]
            replayed = None

        def changed(entry: KeyValue.Entry) -> None:
            if replayed is not None:
                replayed.add(entry.key)
            into.pop(entry.key, None)
            if entry.operation is None and entry.value:
                with contextlib.suppress(msgspec.DecodeError):
                    into[entry.key] = msgspec.json.decode(entry.value, type=kind)
            if into is self.workers:  # only heartbeats expire
                self._forget_expired()

        await follow_bucket(self.js, kv, kind.__name__, changed, loaded)

    def _forget_expired(self) -> None:
        """Drop the heartbeats past their TTL: a worker that stopped without deregistering (killed)
        leaves its key until the bucket's TTL, and the map must not keep it longer."""
        fresh_after = time.time() - worker_ttl()
        for name in [n for n, w in self.workers.items() if w.last_seen <= fresh_after]:
            del self.workers[name]

    def slots(self, pool: str) -> int:
        """The live slots of `pool`: those of its workers whose heartbeat has not expired."""
        fresh_after = time.time() - worker_ttl()
        return sum(
            w.slots for w in list(self.workers.values()) if w.pool == pool and w.last_seen > fresh_after
        )

    def start_at_once(self, pool: str, position: QueuePosition) -> float | None:
        """0 for a job with nothing ahead while a live worker of its pool has a free slot (its
        heartbeat's running jobs fewer than its slots), from memory alone; None otherwise."""
        if not self.speeds or position.ahead:
            return None
        fresh_after = time.time() - worker_ttl()
        free = any(
            w.pool == pool and w.last_seen > fresh_after and len(w.running) < w.slots
            for w in list(self.workers.values())
        )
        return 0.0 if free else None

    def job_seconds(self, job_type: str, params: Mapping[str, Any]) -> float | None:
        """The learned seconds of a whole job of this type and params; None when none was measured.
        A pending job's device is the worker's choice, unknown here: a job that names its device
        and compute type reads its key; otherwise the newest speed of its operation and model
        over every device (`Speed.family`)."""
        if not is_unit_operation(job_type):
            return None
        speed = self.speeds.get(speed_key(job_type, params))
        if speed is None:
            family = speed_family(job_type, params)
            newest = [s for s in list(self.speeds.values()) if s.family == family]
            speed = max(newest, key=lambda s: s.updated_at, default=None)
        return None if speed is None else speed.job_seconds

    def starts(
        self,
        conn: Connection | Session,
        rows: Iterable[JobRow],
        positions: Mapping[str, QueuePosition | None],
    ) -> dict[str, float]:
        """The estimated start of each waiting job of `rows` that has one: one statement per pool."""
        wanted: dict[str, dict[str, int]] = {}
        for row in rows:
            position = positions.get(row.id)
            if row.status in WAITING and position is not None and position.ahead <= MAX_AHEAD:
                wanted.setdefault(row.pool, {})[row.id] = position.ahead
        found: dict[str, float] = {}
        for pool, ids in wanted.items():
            slots = self.slots(pool) if self.speeds else 0
            if slots:
                found |= self._pool_starts(conn, pool, slots, ids)
        return found

    def _pool_starts(
        self, conn: Connection | Session, pool: str, slots: int, wanted: dict[str, int]
    ) -> dict[str, float]:
        """Walk the pool's queue as workers take it, up to the last wanted job."""
        running = case((JOBS.c.status == JobStatus.RUNNING, 0), else_=1)
        query = (
            select(JOBS.c.id, JOBS.c.status, JOBS.c.type, JOBS.c.eta_s, JOBS.c.updated_at, *_speed_params())
            .where(JOBS.c.pool == pool, JOBS.c.status.in_(IN_QUEUE))
            .order_by(running, JOBS.c.priority.desc(), JOBS.c.queue_seq)
            .limit(max(wanted.values()) + 1)
        )
        running_left: list[float] = []
        ahead: list[float] = []
        found: dict[str, float] = {}
        now = datetime.now(UTC)
        unknown = False  # a job ahead whose seconds no one knows: no estimate past it
        for job in conn.execute(query):
            if job.status == JobStatus.RUNNING:
                unknown = unknown or job.eta_s is None
                running_left.append(eta_now(job.eta_s, job.updated_at, now) or 0.0)
                continue
            if job.id in wanted and not unknown:
                start = estimated_start(running_left, slots, ahead)
                if start is not None:
                    found[job.id] = start
            seconds = self.job_seconds(job.type, dict(zip(SPEED_PARAMS, job[5:], strict=True)))
            unknown = unknown or seconds is None
            ahead.append(seconds or 0.0)
        return found


def _speed_params() -> list[Any]:
    """The params the speed key reads, straight from the row's JSON (no decode of the whole)."""
    return [func.json_extract(JOBS.c.params, f"$.{name}").label(name) for name in SPEED_PARAMS]
