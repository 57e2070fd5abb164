"""Figures about the queue: Compileo's queue stats (for the whole deployment: the API and every live
worker), admin statistics and queue status."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError
from nats.js.errors import NotFoundError as NatsNotFoundError
from sqlalchemy import func, select

from app._db import Database, JobRow
from app._queue import BATCH_POOL
from app._schemas import QueueHealth, QueueStats, QueueSummary, Statistics, TypeStatistics
from app._settings import Settings
from streams import (
    PRIORITIES,
    STREAM,
    JobStatus,
    Pool,
    ProcessUsage,
    TaskSupervisor,
    WorkerConsumer,
    WorkerInfo,
    cpu_count,
    rss_mb,
    workers_bucket,
)

HEARTBEATS_READ_S = 2.0
"""How long reading the workers' heartbeats may take before NATS counts as unreachable."""
HIGH_CPU_SHARE = 0.9
"""`resource_utilization` is `high` from this share of the CPUs of the deployment's hosts..."""
HIGH_SLOT_SHARE = 0.9
"""...or from this share of the live workers' slots busy."""
WAITING = (JobStatus.PENDING, JobStatus.RETRYING, JobStatus.RUNNING)
"""The statuses of work a pool needs a live worker for (a running job whose worker is gone waits
for its redelivery)."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """The API process and every live worker process, each counted once."""

    cpu_percent: float
    """Their CPU use, summed, each in percent of one core over its last usage window."""
    memory_mb: float
    """Their resident memory, summed."""
    models_loaded: int
    """Models loaded in their caches, summed."""
    cpu_cores: int
    """The CPUs of their hosts (each host once)."""
    busy_slots: int
    """Slots of live workers running a job."""
    total_slots: int
    """Slots of live workers."""


def deployment(workers: list[WorkerInfo], own_cpu: float, own_rss: float) -> Deployment:
    """Sum the heartbeats' figures with the API's own, one per (host, pid): workers running in the
    API's process (or several in one process) measure that process, which is counted once."""
    processes: dict[tuple[str, int], tuple[float, float, int]] = {}
    cores: dict[str, int] = {}
    for worker in sorted(workers, key=lambda w: w.last_seen):  # the newest beat of a process wins
        processes[(worker.host, worker.pid)] = (worker.cpu_percent, worker.rss_mb, worker.models_loaded)
        cores[worker.host] = max(cores.get(worker.host, 0), worker.cpu_count)
    host, pid = socket.gethostname(), os.getpid()
    models = processes.get((host, pid), (0.0, 0.0, 0))[2]
    processes[(host, pid)] = (own_cpu, own_rss, models)  # measured now, fresher than any beat
    cores[host] = max(cores.get(host, 0), cpu_count())
    return Deployment(
        cpu_percent=round(sum(p[0] for p in processes.values()), 1),
        memory_mb=round(sum(p[1] for p in processes.values()), 1),
        models_loaded=sum(p[2] for p in processes.values()),
        cpu_cores=sum(cores.values()),
        busy_slots=sum(min(len(w.running), w.slots) for w in workers),
        total_slots=sum(w.slots for w in workers),
    )


def queue_health(
    workers: list[WorkerInfo] | None, waiting: Counter[str], figures: Deployment, settings: Settings
) -> QueueHealth:
    """Compileo's queue_health, worked out from the pools, the deployment's figures and the limits
    configured; `workers` is None when NATS did not answer."""
    live = Counter(w.pool for w in workers or [])
    pools = {
        pool: "degraded" if waiting[pool] and not live[pool] else "healthy"
        for pool in sorted({*Pool, *waiting, *live})
    }
    if workers is None or (not workers and waiting.total() > 0):
        status = "unhealthy"  # nothing can run what waits, nor what comes
    else:
        status = "degraded" if "degraded" in pools.values() else "healthy"
    cpu_share = figures.cpu_percent / (100.0 * figures.cpu_cores) if figures.cpu_cores else 0.0
    slot_share = figures.busy_slots / figures.total_slots if figures.total_slots else 0.0
    busy = cpu_share >= HIGH_CPU_SHARE or slot_share >= HIGH_SLOT_SHARE
    limits = [settings.rate_limit_per_minute > 0, settings.max_streams_per_owner > 0]
    return QueueHealth(
        status=status,
        resource_utilization="high" if busy else "optimal",
        limit_enforcement="active" if all(limits) else "partial" if any(limits) else "disabled",
        pools=pools,
        cpu_cores=figures.cpu_cores,
        busy_slots=figures.busy_slots,
        total_slots=figures.total_slots,
    )


class Stats:
    """Reads counts from SQLite, consumers from JetStream and workers from their KV heartbeats."""

    def __init__(self, db: Database, js: JetStreamContext, settings: Settings) -> None:
        self.db = db
        self.js = js
        self.settings = settings
        self.usage = ProcessUsage()
        """This process's CPU use, sampled by the supervised task `cpu-sampler`."""

    def start(self, tasks: TaskSupervisor) -> None:
        """Sample this process's CPU use for as long as `tasks` runs."""
        tasks.start("cpu-sampler", self.usage.run)

    async def workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat has not expired (none while NATS does not answer)."""
        return await self.heartbeats() or []

    async def heartbeats(self) -> list[WorkerInfo] | None:
        """Workers whose heartbeat has not expired; None when NATS did not answer."""
        try:
            async with asyncio.timeout(HEARTBEATS_READ_S):
                kv = await workers_bucket(self.js)
                try:
                    keys = await kv.keys()
                except NoKeysError:  # nobody is up
                    return []
                views = []
                for key in keys:
                    try:
                        entry = await kv.get(key)
                        if entry.value:
                            views.append(msgspec.json.decode(entry.value, type=WorkerInfo))
                    except (NatsNotFoundError, msgspec.DecodeError):
                        continue  # gone since `keys`, or not a heartbeat
        except (nats.errors.Error, TimeoutError):
            return None
        return sorted(views, key=lambda w: (w.pool, w.name))

    async def counts(self, owner: str | None) -> Counter[str]:
        """Jobs by status; a batch counts as its children (its parent row is not a job to run)."""
        query = select(JobRow.status, func.count()).where(JobRow.pool != BATCH_POOL).group_by(JobRow.status)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        return Counter({status: count for status, count in rows})

    async def waiting_by_pool(self) -> Counter[str]:
        """Jobs of every owner that need a live worker of their pool (see WAITING)."""
        query = (
            select(JobRow.pool, func.count())
            .where(JobRow.status.in_(WAITING), JobRow.pool != BATCH_POOL)
            .group_by(JobRow.pool)
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        return Counter({pool: count for pool, count in rows})

    async def queue_stats(self, owner: str | None) -> QueueStats:
        """The Compileo /queue/stats figures: the caller's jobs, the whole deployment's resources."""
        counts = await self.counts(owner)
        waiting = await self.waiting_by_pool()
        workers = await self.heartbeats()
        figures = deployment(workers or [], self.usage.cpu_percent(), rss_mb())
        return QueueStats(
            pending_jobs=counts[JobStatus.PENDING], running_jobs=counts[JobStatus.RUNNING],
            scheduled_jobs=counts[JobStatus.SCHEDULED], completed_jobs=counts[JobStatus.COMPLETED],
            failed_jobs=counts[JobStatus.FAILED], cancelled_jobs=counts[JobStatus.CANCELLED],
            retrying_jobs=counts[JobStatus.RETRYING], total_jobs=sum(counts.values()),
            queue_type="nats-jetstream", cache_size=figures.models_loaded,
            cpu_usage_percent=figures.cpu_percent, memory_usage_mb=figures.memory_mb,
            active_workers=len(workers or []),
            queue_health=queue_health(workers, waiting, figures, self.settings),
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
