"""GET /metrics in the Prometheus text format, fed by real jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app._metrics import Metrics
from streams import Completed, Started
from tests.conftest import WorkerRunner, submit, wait_terminal


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample, read with prometheus_client's own parser (label order is free)."""
    values = [
        found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == name and found.labels == labels
    ]
    assert len(values) == 1, f"{name}{labels} missing from:\n{text}"
    return values[0]


async def test_metrics_follow_jobs(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    done = [await submit(client, params={"steps": 2, "duration_s": 0.05}) for _ in range(3)]
    failed = await submit(client, params={"fail": True})
    for job in [*done, failed]:
        await wait_terminal(client, job["id"])
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, "jobcast_jobs", type="noop", status="completed") == 3
    assert sample(text, "jobcast_jobs", type="noop", status="failed") == 1
    assert sample(text, "jobcast_job_run_seconds_count", type="noop") == 4
    assert sample(text, "jobcast_job_run_seconds_bucket", type="noop", le="+Inf") == 4
    assert sample(text, "jobcast_job_run_seconds_sum", type="noop") >= 0.15
    assert sample(text, "jobcast_job_queue_wait_seconds_count", type="noop") == 4
    assert sample(text, "jobcast_events_total", kind="completed") == 3
    assert sample(text, "jobcast_events_total", kind="submitted") == 4
    assert sample(text, "jobcast_workers") == 1
    assert sample(text, "jobcast_open_streams") >= 0
    assert "# TYPE jobcast_job_run_seconds histogram" in text


async def test_queue_depth(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await submit(client)
    text = (await client.get("/metrics")).text
    assert sample(text, "jobcast_queue_depth", pool="cpu") == 2
    assert sample(text, "jobcast_workers") == 0


@dataclass(frozen=True)
class Times:
    """A job as the metrics see it when an event applies."""

    type: str
    attempt: int
    created_at: datetime
    started_at: datetime | None


def test_each_app_counts_in_its_own_registry() -> None:
    """Two apps in one process (as in the tests) neither clash nor see each other's figures."""
    first, second = Metrics(), Metrics()
    created = datetime(2026, 1, 1, tzinfo=UTC)
    started = created + timedelta(seconds=2)
    first.observe(Times("noop", 1, created, None), Started(job_id="j", worker="w", ts=started))
    first.observe(
        Times("noop", 1, created, started), Completed(job_id="j", ts=started + timedelta(seconds=0.3))
    )
    text = generate_latest(first.registry).decode()
    assert sample(text, "jobcast_events_total", kind="started") == 1
    assert sample(text, "jobcast_job_queue_wait_seconds_sum", type="noop") == 2.0
    assert sample(text, "jobcast_job_queue_wait_seconds_bucket", type="noop", le="2.5") == 1
    assert sample(text, "jobcast_job_queue_wait_seconds_bucket", type="noop", le="1.0") == 0
    assert sample(text, "jobcast_job_run_seconds_bucket", type="noop", le="0.5") == 1
    assert "_created" not in text  # one series per figure
    assert "jobcast_events_total{" not in generate_latest(second.registry).decode()
