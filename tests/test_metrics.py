"""GET /metrics in the Prometheus text format, fed by real jobs."""

from __future__ import annotations

import re

import httpx

from tests.conftest import WorkerRunner, submit, wait_terminal


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"{name}{labels} missing from:\n{text}"
    return float(match[1])


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
