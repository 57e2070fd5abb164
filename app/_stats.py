"""Figures about the queue: Compileo's queue stats (for the whole deployment: the API and every live
worker), admin statistics and queue status."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as NatsNotFoundError
from sqlalchemy import func, select

from app._db import Database, JobRow
from app._queue import IN_QUEUE
from app._schemas import QueueHealth, QueueStats, QueueSummary, Statistics, TypeStatistics
from app._settings import Settings
from streams import (
    PARENT_POOLS,
    PRIORITIES,
    STREAM,
    JobStatus,
    Pool,
    ProcessUsage,
    TaskSupervisor,
    WorkerConsumer,
    WorkerInfo,
    existing_workers_bucket,
    machine_id,
    rss_mb,
    usable_cpus,
)

HEARTBEATS_READ_S = 2.0
"""How long reading the workers' heartbeats may take before NATS counts as unreachable."""
HIGH_CPU_PERCENT = 90.0
"""`resource_utilization` is `high` from this share (in percent) of the deployment's CPUs in use..."""
HIGH_SLOT_SHARE = 0.9
"""...or from this share of the live workers' slots busy."""


@dataclass(frozen=True, slots=True)
class Process:
    """One process of the deployment, as its heartbeat describes it or the API measures itself."""

    host: str
    """Its hostname: in Docker, its container's."""
    pid: int
    machine: str
    """The kernel it runs on (`machine_id`), shared by the containers of one machine."""
    cpus: float
    """The CPUs it may use: its affinity, narrowed by its cgroups' quota."""
    machine_cpus: int
    """The CPUs of its machine (0: unknown)."""
    core_percent: float
    """Its CPU use over its last usage window, in percent of one core."""
    rss_mb: float
    models_loaded: int

    @classmethod
    def of(cls, worker: WorkerInfo) -> Process:
        """The process a heartbeat describes (a worker older than `machine` stands for its host)."""
        return cls(
            host=worker.host, pid=worker.pid, machine=worker.machine or worker.host,
            cpus=usable_cpus(worker.cpu_count, worker.cpu_quota), machine_cpus=worker.machine_cpus,
            core_percent=worker.cpu_percent, rss_mb=worker.rss_mb, models_loaded=worker.models_loaded,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Deployment:
    """The API process and every live worker process, each counted once."""

    core_percent: float
    """Their CPU use, summed, each in percent of one core over its last usage window."""
    cpu_percent: float
    """The same in percent of the CPUs they may use (`cpu_cores`): 0 to 100."""
    memory_mb: float
    """Their resident memory, summed."""
    models_loaded: int
    """Models loaded in their caches, summed."""
    cpu_cores: float
    """The CPUs they may use (see `deployment_cpus`)."""
    busy_slots: int
    """Slots of live workers running a job."""
    total_slots: int
    """Slots of live workers."""


def deployment(workers: list[WorkerInfo], own: Process) -> Deployment:
    """Sum the heartbeats' figures with the API's own, one per (host, pid): workers running in the
    API's process (or several in one process) measure that process, which is counted once."""
    processes: dict[tuple[str, int], Process] = {}
    for worker in sorted(workers, key=lambda w: w.last_seen):  # the newest beat of a process wins
        processes[(worker.host, worker.pid)] = Process.of(worker)
    beat = processes.get((own.host, own.pid))
    # the API measures itself now, fresher than any beat; its workers' beats say what they hold
    processes[(own.host, own.pid)] = replace(own, models_loaded=beat.models_loaded if beat else 0)
    core_percent = sum(p.core_percent for p in processes.values())
    cpu_cores = deployment_cpus(processes.values())
    return Deployment(
        core_percent=round(core_percent, 1),
        cpu_percent=round(min(100.0, core_percent / cpu_cores), 1) if cpu_cores else 0.0,
        memory_mb=round(sum(p.rss_mb for p in processes.values()), 1),
        models_loaded=sum(p.models_loaded for p in processes.values()),
        cpu_cores=round(cpu_cores, 2),
        busy_slots=sum(min(len(w.running), w.slots) for w in workers),
        total_slots=sum(w.slots for w in workers),
    )


def deployment_cpus(processes: Iterable[Process]) -> float:
    """The CPUs the processes may use: per machine (by boot id, not by hostname, which is each
    container's own), those of each of its containers (by hostname: the processes of one container
    share its CPUs) summed, and no more than the machine has."""
    containers: defaultdict[str, dict[str, float]] = defaultdict(dict)
    machine_cpus: Counter[str] = Counter()
    for process in processes:
        hosts = containers[process.machine]
        hosts[process.host] = max(hosts.get(process.host, 0.0), process.cpus)
        machine_cpus[process.machine] = max(machine_cpus[process.machine], process.machine_cpus)
    return sum(min(sum(hosts.values()), machine_cpus[m] or math.inf) for m, hosts in containers.items())


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
    slot_share = figures.busy_slots / figures.total_slots if figures.total_slots else 0.0
    busy = figures.cpu_percent >= HIGH_CPU_PERCENT or slot_share >= HIGH_SLOT_SHARE
    limits = [settings.rate_limit_per_minute > 0, settings.max_streams_per_owner > 0]
    return QueueHealth(
        status=status,
        resource_utilization="high" if busy else "optimal",
        limit_enforcement="active" if all(limits) else "partial" if any(limits) else "disabled",
        pools=pools,
        cpu_core_percent=figures.core_percent,
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
        views: dict[str, WorkerInfo] = {}
        initial_done = False
        try:
            async with asyncio.timeout(HEARTBEATS_READ_S):
                kv = await existing_workers_bucket(self.js)
                if kv is None:
                    return []  # no worker has started yet
                # nats.py may say its initial values are done while the last of them is still in
                # flight (it reads its consumer's pending count meanwhile): a heartbeat stored a
                # moment before would be missing. The bucket's newest message is the newest of its
                # key, so the watch delivers it: read until it has come.
                state = (await kv.status()).stream_info.state
                newest = state.last_seq if state.messages else 0
                # One watch delivers every key's latest value: a few requests however many workers
                # there are, not one each. Its ephemeral consumer goes once the watch has stopped.
                watcher = await kv.watchall(inactive_threshold=HEARTBEATS_READ_S)
                try:
                    seen = 0
                    async for entry in watcher:
                        if entry is None:  # the initial values are in, but for one maybe in flight
                            initial_done = True
                        else:
                            seen = max(seen, entry.revision or 0)
                            views.pop(entry.key, None)  # a later value of a key replaces the earlier
                            if entry.operation is None:  # a heartbeat, not a worker's deregistering
                                with contextlib.suppress(msgspec.DecodeError):  # not a heartbeat
                                    views[entry.key] = msgspec.json.decode(
                                        entry.value or b"", type=WorkerInfo
                                    )
                        if initial_done and seen >= newest:
                            break
                finally:
                    with contextlib.suppress(nats.errors.Error):
                        await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
        except TimeoutError:
            if not initial_done:
                return None
            # The newest message expired before the watch delivered it: what came is all there is.
        except nats.errors.Error:
            return None
        return sorted(views.values(), key=lambda w: (w.pool, w.name))

    def own_process(self) -> Process:
        """The API's own process, measured now."""
        return Process(
            host=socket.gethostname(), pid=os.getpid(), machine=machine_id(), cpus=self.usage.cpus(),
            machine_cpus=os.cpu_count() or 0, core_percent=self.usage.cpu_percent(), rss_mb=rss_mb(),
            models_loaded=0,
        )  # fmt: skip

    async def counts(self, owner: str | None) -> Counter[str]:
        """Jobs by status; a batch counts as its children (its parent row is not a job to run)."""
        query = (
            select(JobRow.status, func.count())
            .where(JobRow.pool.not_in(sorted(PARENT_POOLS)))
            .group_by(JobRow.status)
        )
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        return Counter({status: count for status, count in rows})

    async def waiting_by_pool(self) -> Counter[str]:
        """Jobs of every owner that need a live worker of their pool: those in its queue (`IN_QUEUE`:
        a running job whose worker is gone waits for its redelivery)."""
        query = (
            select(JobRow.pool, func.count())
            .where(JobRow.status.in_(IN_QUEUE), JobRow.pool.not_in(sorted(PARENT_POOLS)))
            .group_by(JobRow.pool)
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        return Counter({pool: count for pool, count in rows})

    async def queue_stats(self, owner: str | None, workers: list[WorkerInfo] | None) -> QueueStats:
        """The Compileo /queue/stats figures: the caller's jobs, the whole deployment's resources
        (`workers`: the `heartbeats` read for them)."""
        counts = await self.counts(owner)
        waiting = await self.waiting_by_pool()
        figures = deployment(workers or [], self.own_process())
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

    async def statistics(self, workers: list[WorkerInfo] | None = None) -> Statistics:
        """Overall and per type: counts, success and failure rates, run time and queue wait; and the
        queue: pending and running jobs by type, live workers (`workers`, read when None)."""
        query = select(
            JobRow.type, JobRow.pool, JobRow.status, JobRow.created_at, JobRow.started_at, JobRow.completed_at
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        by_type: defaultdict[str, list[Any]] = defaultdict(list)
        for row in rows:
            by_type[row.type].append(row)
        work = [row for row in rows if row.pool not in PARENT_POOLS]
        workers = await self.workers() if workers is None else workers
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
