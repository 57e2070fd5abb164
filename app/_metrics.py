"""Prometheus metrics at GET /metrics, in the text exposition format (no client library needed)."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select

from app._db import Database, JobRow
from streams import Event, JobStatus, Started, is_terminal

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)


class Histogram:
    """Cumulative buckets per label value, the Prometheus way."""

    def __init__(self, name: str, help_text: str, label: str) -> None:
        self.name, self.help, self.label = name, help_text, label
        self.counts: dict[str, list[int]] = {}
        self.sums: defaultdict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        """Count one observation."""
        counts = self.counts.setdefault(label, [0] * (len(BUCKETS) + 1))
        counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sums[label] += value

    def lines(self) -> Iterable[str]:
        """The exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for label, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                yield f'{self.name}_bucket{{{self.label}="{label}",le="{le}"}} {running}'
            yield f'{self.name}_sum{{{self.label}="{label}"}} {self.sums[label]:.6f}'
            yield f'{self.name}_count{{{self.label}="{label}"}} {running}'


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

    def lines(self) -> list[str]:
        """The exposition lines."""
        return [
            "# HELP jobcast_client_buffered_bytes Event bytes waiting for live clients' sockets.",
            "# TYPE jobcast_client_buffered_bytes gauge",
            f"jobcast_client_buffered_bytes {self.client_bytes}",
            "# HELP jobcast_clients_cut_off_total Live clients cut off for falling too far behind.",
            "# TYPE jobcast_clients_cut_off_total counter",
            f"jobcast_clients_cut_off_total {self.cut_offs}",
            "# HELP jobcast_projection_queued Stream messages received but not yet applied.",
            "# TYPE jobcast_projection_queued gauge",
            f"jobcast_projection_queued {self.projection_messages}",
            "# HELP jobcast_projection_restarts_total Projection consumer restarts at its bound.",
            "# TYPE jobcast_projection_restarts_total counter",
            f"jobcast_projection_restarts_total {self.projection_restarts}",
        ]


class Metrics:
    """What the projection observes as it applies events, and what is read on each scrape."""

    def __init__(self) -> None:
        self.events = Counter[str]()
        self.run_time = Histogram(
            "jobcast_job_run_seconds", "Time from started to the end of an attempt.", "type"
        )
        self.queue_wait = Histogram(
            "jobcast_job_queue_wait_seconds", "Time from submission to start.", "type"
        )

    def observe(self, job: JobTimes, event: Event) -> None:
        """Called by the projection for every applied event, once its batch is committed."""
        self.events[event.kind] += 1
        if isinstance(event, Started) and event.attempt == job.attempt:
            self.queue_wait.observe(job.type, max(0.0, (event.ts - job.created_at).total_seconds()))
        elif is_terminal(event) and job.started_at is not None:
            self.run_time.observe(job.type, max(0.0, (event.ts - job.started_at).total_seconds()))

    async def render(
        self, db: Database, workers: int, streams: int, subscriptions: int, buffers: Buffers | None = None
    ) -> str:
        """The whole exposition."""
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
        lines = ["# HELP jobcast_jobs Jobs by status and type.", "# TYPE jobcast_jobs gauge"]
        lines += [f'jobcast_jobs{{type="{t}",status="{s}"}} {n}' for t, s, n in sorted(by_status)]
        lines += ["# HELP jobcast_queue_depth Pending jobs per pool.", "# TYPE jobcast_queue_depth gauge"]
        lines += [f'jobcast_queue_depth{{pool="{p}"}} {n}' for p, n in sorted(depth)]
        lines += [
            "# HELP jobcast_events_total Events applied by this API process, by kind.",
            "# TYPE jobcast_events_total counter",
        ]
        lines += [f'jobcast_events_total{{kind="{k}"}} {n}' for k, n in sorted(self.events.items())]
        lines += [*self.run_time.lines(), *self.queue_wait.lines()]
        lines += [
            "# HELP jobcast_open_streams Open SSE, WebSocket and long-poll connections.",
            "# TYPE jobcast_open_streams gauge",
            f"jobcast_open_streams {streams}",
            "# HELP jobcast_subscriptions Live event subscriptions in this API process.",
            "# TYPE jobcast_subscriptions gauge",
            f"jobcast_subscriptions {subscriptions}",
            "# HELP jobcast_workers Workers with a live heartbeat.",
            "# TYPE jobcast_workers gauge",
            f"jobcast_workers {workers}",
        ]
        if buffers is not None:
            lines += buffers.lines()
        return "\n".join(lines) + "\n"
