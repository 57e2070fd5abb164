"""Figures about the queue: Compileo's queue stats, admin statistics and queue status."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as NatsNotFoundError
from sqlalchemy import func, select

from app._db import Database, JobRow
from app._queue import BATCH_POOL
from app._schemas import QueueHealth, QueueStats, QueueSummary, Statistics, TypeStatistics
from streams import PRIORITIES, STREAM, JobStatus, Pool, WorkerConsumer, WorkerInfo, workers_bucket


class _CpuMeter:
    """This process's CPU use since the previous reading, in percent of one core."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), time.process_time())

    def read(self) -> float:
        now = (time.monotonic(), time.process_time())
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return round(100.0 * cpu / wall, 1) if wall > 0 else 0.0


def rss_mb() -> float:
    """Resident memory of this process in MB (peak where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as statm:
        return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Stats:
    """Reads counts from SQLite, consumers from JetStream and workers from their KV heartbeats."""

    def __init__(self, db: Database, js: JetStreamContext) -> None:
        self.db = db
        self.js = js
        self._cpu = _CpuMeter()

    async def workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat has not expired."""
        kv = await workers_bucket(self.js)
        try:
            keys = await kv.keys()
        except nats.errors.Error:  # NoKeysError: nobody is up
            return []
        views = []
        for key in keys:
            with contextlib.suppress(nats.errors.Error, msgspec.DecodeError):
                entry = await kv.get(key)
                if entry.value:
                    views.append(msgspec.json.decode(entry.value, type=WorkerInfo))
        return sorted(views, key=lambda w: (w.pool, w.name))

    async def counts(self, owner: str | None) -> Counter[str]:
        """Jobs by status (top-level and children alike)."""
        query = select(JobRow.status, func.count()).group_by(JobRow.status)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        return Counter({status: count for status, count in rows})

    async def queue_stats(self, owner: str | None, subscribers: int) -> QueueStats:
        """The Compileo /queue/stats figures."""
        counts = await self.counts(owner)
        workers = await self.workers()
        cpu, memory = self._cpu.read(), rss_mb()
        healthy = bool(workers) or counts[JobStatus.PENDING] == 0
        return QueueStats(
            pending_jobs=counts[JobStatus.PENDING], running_jobs=counts[JobStatus.RUNNING],
            scheduled_jobs=counts[JobStatus.SCHEDULED], completed_jobs=counts[JobStatus.COMPLETED],
            failed_jobs=counts[JobStatus.FAILED], cancelled_jobs=counts[JobStatus.CANCELLED],
            retrying_jobs=counts[JobStatus.RETRYING], total_jobs=sum(counts.values()),
            queue_type="nats-jetstream", cache_size=subscribers, cpu_usage_percent=cpu,
            memory_usage_mb=memory, active_workers=len(workers),
            queue_health=QueueHealth(
                status="healthy" if healthy else "degraded",
                resource_utilization="high" if cpu > 90 else "optimal",
                limit_enforcement="active",
            ),
        )  # fmt: skip

    async def statistics(self) -> Statistics:
        """Overall and per type: counts, success and failure rates, run time and queue wait; and the
        queue: pending and running jobs by type, live workers."""
        query = select(
            JobRow.type, JobRow.pool, JobRow.status, JobRow.created_at, JobRow.started_at, JobRow.completed_at
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        by_type: defaultdict[str, list[Any]] = defaultdict(list)
        for row in rows:
            by_type[row.type].append(row)
        work = [row for row in rows if row.pool != BATCH_POOL]
        workers = await self.workers()
        queue = QueueSummary(
            pending=sum(row.status == JobStatus.PENDING for row in work),
            running=sum(row.status == JobStatus.RUNNING for row in work),
            pending_by_type=dict(
                sorted(Counter(r.type for r in work if r.status == JobStatus.PENDING).items())
            ),
            running_by_type=dict(
                sorted(Counter(r.type for r in work if r.status == JobStatus.RUNNING).items())
            ),
            live_workers=len(workers),
            workers_by_pool=dict(sorted(Counter(worker.pool for worker in workers).items())),
        )
        return Statistics(
            totals=_type_statistics(work),
            by_type={job_type: _type_statistics(rows) for job_type, rows in sorted(by_type.items())},
            queue=queue,
        )

    async def queue_status(self) -> dict[str, Any]:
        """Pending work by type and pool, each pool's consumers as JetStream sees them, and workers."""
        query = (
            select(JobRow.pool, JobRow.type, func.count())
            .where(JobRow.status == JobStatus.PENDING)
            .group_by(JobRow.pool, JobRow.type)
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        pending_by_type: Counter[str] = Counter()
        pending_by_pool: Counter[str] = Counter()
        for pool, job_type, count in rows:
            pending_by_type[job_type] += count
            pending_by_pool[pool] += count
        consumers: dict[str, dict[str, int]] = {}
        for pool in Pool:
            totals = Counter[str]()
            for priority in PRIORITIES:
                with contextlib.suppress(NatsNotFoundError, nats.errors.Error):
                    info = await self.js.consumer_info(STREAM, WorkerConsumer(pool, priority).durable)
                    totals["pending"] += info.num_pending or 0
                    totals["ack_pending"] += info.num_ack_pending or 0
                    totals["redelivered"] += info.num_redelivered or 0
                    totals["waiting"] += info.num_waiting or 0
            consumers[pool] = dict(totals)
        workers = await self.workers()
        return {
            "pending_by_type": dict(pending_by_type),
            "pending_by_pool": dict(pending_by_pool),
            "consumers": consumers,
            "workers": [msgspec.to_builtins(w) for w in workers],
        }


def _type_statistics(rows: list[Any]) -> TypeStatistics:
    counts = Counter(row.status for row in rows)
    finished = counts[JobStatus.COMPLETED] + counts[JobStatus.FAILED]
    run_times = sorted(
        (row.completed_at - row.started_at).total_seconds()
        for row in rows
        if row.started_at and row.completed_at and row.status in (JobStatus.COMPLETED, JobStatus.FAILED)
    )
    waits = [(row.started_at - row.created_at).total_seconds() for row in rows if row.started_at]
    return TypeStatistics(
        total=len(rows),
        counts=dict(sorted(counts.items())),
        success_rate=round(counts[JobStatus.COMPLETED] / finished, 4) if finished else None,
        failure_rate=round(counts[JobStatus.FAILED] / finished, 4) if finished else None,
        avg_run_s=round(statistics.fmean(run_times), 4) if run_times else None,
        p50_run_s=_percentile(run_times, 50),
        p95_run_s=_percentile(run_times, 95),
        avg_queue_wait_s=round(statistics.fmean(waits), 4) if waits else None,
    )


def _percentile(ordered: list[float], pct: int) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return None
    rank = max(1, -(-pct * len(ordered) // 100))
    return round(ordered[rank - 1], 4)
