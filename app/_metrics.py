"""Prometheus metrics at GET /metrics, with prometheus_client.

What the projection observes as it applies events (events by kind, run-time and queue-wait
histograms) lives in prometheus_client's own metrics; what is read at each scrape (jobs and queue
depth from SQLite, workers, open streams, the bounded buffers) is yielded by `Scrape`, a custom
collector. Each app has its own registry: several run in one test process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app._db import Database, JobRow
from streams import Completed, Event, JobStatus, Started, is_terminal

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The text format `generate_latest` writes."""

# One series per figure, as before: no `_created` timestamps beside each counter and histogram.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client


class JobTimes(Protocol):
    """What the metrics read of a job when an event is applied to it."""

    @property
    def type(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class Buffers:
    """How full the API's bounded buffers are right now."""

    client_bytes: int
    """Event bytes waiting for SSE, WebSocket and long-poll clients, all together."""
    cut_offs: int
    """Clients cut off for falling too far behind, since start."""
    projection_messages: int
    """Stream messages received but not yet applied."""
    projection_restarts: int
    """Times the projection's consumer was stopped at its bound and started again."""


@dataclass(frozen=True, slots=True)
class Scrape(Collector):
    """The figures read for one scrape: from SQLite and from the API's live state."""

    jobs: list[tuple[str, str, int]]
    """(type, status, count) of every job."""
    queue_depth: list[tuple[str, int]]
    """(pool, count) of pending jobs."""
    workers: int
    open_streams: int
    subscriptions: int
    buffers: Buffers | None = None

    def collect(self) -> Iterator[Metric]:
        """The families, in prometheus_client's form."""
        jobs = GaugeMetricFamily("jobcast_jobs", "Jobs by status and type.", labels=["type", "status"])
        for job_type, status, count in sorted(self.jobs):
            jobs.add_metric([job_type, status], count)
        yield jobs
        depth = GaugeMetricFamily("jobcast_queue_depth", "Pending jobs per pool.", labels=["pool"])
        for pool, count in sorted(self.queue_depth):
            depth.add_metric([pool], count)
        yield depth
        yield GaugeMetricFamily(
            "jobcast_open_streams", "Open SSE, WebSocket and long-poll connections.", value=self.open_streams
        )
        yield GaugeMetricFamily(
            "jobcast_subscriptions", "Live event subscriptions in this API process.", value=self.subscriptions
        )
        yield GaugeMetricFamily("jobcast_workers", "Workers with a live heartbeat.", value=self.workers)
        if (buffers := self.buffers) is not None:
            yield GaugeMetricFamily(
                "jobcast_client_buffered_bytes",
                "Event bytes waiting for live clients' sockets.",
                value=buffers.client_bytes,
            )
            yield CounterMetricFamily(
                "jobcast_clients_cut_off",
                "Live clients cut off for falling too far behind.",
                value=buffers.cut_offs,
            )
            yield GaugeMetricFamily(
                "jobcast_projection_queued",
                "Stream messages received but not yet applied.",
                value=buffers.projection_messages,
            )
            yield CounterMetricFamily(
                "jobcast_projection_restarts",
                "Projection consumer restarts at its bound.",
                value=buffers.projection_restarts,
            )


class Metrics:
    """What the projection observes as it applies events, and what is read on each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.events = Counter(
            "jobcast_events", "Events applied by this API process, by kind.", ["kind"], registry=self.registry
        )
        self.run_time = Histogram(
            "jobcast_job_run_seconds", "Time from started to the end of an attempt.", ["type"],
            buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "jobcast_job_queue_wait_seconds", "Time from submission to start.", ["type"],
            buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        # From the completions this API applies, as `jobcast_events`: every instance applies the
        # whole stream, so each counts every worker's jobs once, whichever worker ran them.
        self.cache_hits = Counter(
            "jobcast_cache_hits", "Jobs completed from the stage cache, by operation.", ["operation"],
            registry=self.registry,
        )  # fmt: skip
        self.cache_misses = Counter(
            "jobcast_cache_misses",
            "Jobs of cacheable operations that ran their handler (nothing cached, or `cache: false`), by operation.",
            ["operation"], registry=self.registry,
        )  # fmt: skip

    def observe(self, job: JobTimes, event: Event) -> None:
        """Called by the projection for every applied event, once its batch is committed."""
        self.events.labels(event.kind).inc()
        if isinstance(event, Started) and event.attempt == job.attempt:
            wait = max(0.0, (event.ts - job.created_at).total_seconds())
            self.queue_wait.labels(job.type).observe(wait)
        elif is_terminal(event) and job.started_at is not None:
            self.run_time.labels(job.type).observe(max(0.0, (event.ts - job.started_at).total_seconds()))
        if isinstance(event, Completed) and event.result is not None:
            cached = event.result.get("cached")
            if cached is True:
                self.cache_hits.labels(job.type).inc()
            elif cached is False:
                self.cache_misses.labels(job.type).inc()

    async def render(
        self, db: Database, workers: int, streams: int, subscriptions: int, buffers: Buffers | None = None
    ) -> bytes:
        """The whole exposition, in the text format of CONTENT_TYPE."""
        async with db.session() as session:
            by_status = (
                await session.execute(
                    select(JobRow.type, JobRow.status, func.count()).group_by(JobRow.type, JobRow.status)
                )
            ).all()
            depth = (
                await session.execute(
                    select(JobRow.pool, func.count())
                    .where(JobRow.status == JobStatus.PENDING)
                    .group_by(JobRow.pool)
                )
            ).all()
        scrape = Scrape(
            jobs=[(t, s, n) for t, s, n in by_status],
            queue_depth=[(p, n) for p, n in depth],
            workers=workers,
            open_streams=streams,
            subscriptions=subscriptions,
            buffers=buffers,
        )
        return generate_latest(scrape) + generate_latest(self.registry)
