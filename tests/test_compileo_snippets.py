"""Seed 004 (Compileo), the rest of its Python snippets, unchanged but for the base URL, against a
real server: queue health, batch monitoring, the complete workflow, adaptive polling and the
resilient session. (tests/test_compileo.py runs the status, long-poll, stream and recovery ones.)"""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any

import httpx
import pytest

from tests.conftest import ApiServer, WorkerRunner, free_port, submit, wait_terminal
from tests.test_compileo import SNIPPETS, check_status_view, faster
from workers import WorkerSettings

# Copied verbatim from the document ("Best Practices": batch job management, queue health,
# job lifecycle and polling strategies); they call the snippets of tests/test_compileo.py.
MORE_SNIPPETS = r'''
def monitor_multiple_jobs(job_ids):
    """Monitor multiple jobs concurrently."""
    import threading
    import queue

    results = {}
    result_queue = queue.Queue()

    def monitor_single_job(job_id):
        try:
            result = monitor_job_completion(job_id)
            result_queue.put((job_id, result))
        except Exception as e:
            result_queue.put((job_id, {'error': str(e)}))

    # Start monitoring threads
    threads = []
    for job_id in job_ids:
        thread = threading.Thread(target=monitor_single_job, args=(job_id,))
        thread.start()
        threads.append(thread)

    # Collect results
    for _ in range(len(job_ids)):
        job_id, result = result_queue.get()
        results[job_id] = result

    # Wait for all threads to complete
    for thread in threads:
        thread.join()

    return results


def check_queue_health():
    """Check overall queue health and performance."""
    try:
        response = requests.get('http://localhost:8000/api/v1/jobs/queue/stats')
        response.raise_for_status()
        stats = response.json()

        # Check for concerning metrics
        alerts = []

        if stats['failed_jobs'] > stats['total_jobs'] * 0.1:  # >10% failure rate
            alerts.append(f"High failure rate: {stats['failed_jobs']}/{stats['total_jobs']} jobs failed")

        if stats['cpu_usage_percent'] > 90:
            alerts.append(f"High CPU usage: {stats['cpu_usage_percent']}%")

        if stats['memory_usage_mb'] > 1000:  # >1GB
            alerts.append(f"High memory usage: {stats['memory_usage_mb']}MB")

        if stats['pending_jobs'] > 10:
            alerts.append(f"Large pending queue: {stats['pending_jobs']} jobs waiting")

        if not alerts:
            print("Queue health: GOOD")
            print(f"Active jobs: {stats['running_jobs']}")
            print(f"Workers: {stats.get('active_workers', 'unknown')}")
        else:
            print("Queue health: WARNING")
            for alert in alerts:
                print(f"  - {alert}")

        return stats

    except Exception as e:
        print(f"Failed to check queue health: {e}")
        return None


def submit_and_monitor_job(job_type, parameters):
    """Complete workflow: submit job, monitor progress, handle results."""
    # This would typically be called after submitting a job via another API
    # For example, after calling document processing API

    # Assume job_id is obtained from job submission
    job_id = "example-job-id-from-submission"

    print(f"Monitoring job {job_id}...")

    # Monitor job completion
    final_status = monitor_job_completion(job_id)

    if final_status['status'] == 'completed':
        print("Job completed successfully!")
        if final_status.get('result'):
            print(f"Result: {final_status['result']}")

        # Process results based on job type
        if job_type == 'document_processing':
            print("Documents processed successfully")
        elif job_type == 'taxonomy_generation':
            print("Taxonomy generated successfully")
        elif job_type == 'dataset_generation':
            print("Dataset created successfully")

    elif final_status['status'] == 'failed':
        print(f"Job failed: {final_status.get('error', 'Unknown error')}")
        # Handle failure - retry, notify user, etc.

    elif final_status['status'] == 'cancelled':
        print("Job was cancelled")
        # Handle cancellation

    return final_status


def adaptive_polling(job_id, initial_interval=1, max_interval=30):
    """Adapt polling frequency based on job progress."""
    import time

    last_progress = 0
    interval = initial_interval

    while True:
        response = requests.get(f'http://localhost:8000/api/v1/jobs/status/{job_id}')
        job_status = response.json()

        current_progress = job_status['progress']

        # If progress changed significantly, reset to faster polling
        if current_progress - last_progress > 5:  # 5% progress change
            interval = max(initial_interval, interval / 2)
        else:
            # Gradually slow down polling
            interval = min(interval * 1.2, max_interval)

        print(f"Progress: {current_progress:.1f}% - Next check in {interval:.1f}s")

        if job_status['status'] in ['completed', 'failed', 'cancelled']:
            return job_status

        time.sleep(interval)
        last_progress = current_progress
'''

# Copied verbatim too ("Connection Pooling for High-Frequency Monitoring"): its last two lines run
# at once and use a `job_id` the document never defines; the test supplies one.
RESILIENT_SESSION = r'''
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

def create_resilient_session():
    """Create HTTP session with connection pooling and retries."""
    session = requests.Session()

    # Configure retries
    retry_strategy = Retry(
        total=3,
        backoff_factor=0.5,
        status_forcelist=[429, 500, 502, 503, 504]
    )

    # Configure adapter with connection pooling
    adapter = HTTPAdapter(
        max_retries=retry_strategy,
        pool_connections=10,
        pool_maxsize=20
    )

    session.mount("http://", adapter)
    session.mount("https://", adapter)

    return session

# Use resilient session for monitoring
session = create_resilient_session()
response = session.get(f'http://localhost:8000/api/v1/jobs/status/{job_id}')
'''


def snippets(base_url: str) -> dict[str, Any]:
    """All the document's functions, talking to `base_url`."""
    namespace: dict[str, Any] = {"__name__": "compileo_snippets"}
    exec((SNIPPETS + MORE_SNIPPETS).replace("http://localhost:8000", base_url), namespace)
    return namespace


@pytest.fixture
def compileo(api: ApiServer) -> dict[str, Any]:
    """The document's functions, talking to this test's API."""
    return snippets(api.url)


UNKNOWN_JOB = "123e4567-e89b-12d3-a456-426614174000"


def resource_alerts(stats: dict[str, Any]) -> list[str]:
    """The lines check_queue_health adds for the measured CPU and memory of the deployment (the
    test's own process is the API and may be busy or big; the job counts are the test's to set)."""
    lines = []
    if stats["cpu_usage_percent"] > 90:
        lines.append(f"  - High CPU usage: {stats['cpu_usage_percent']}%")
    if stats["memory_usage_mb"] > 1000:
        lines.append(f"  - High memory usage: {stats['memory_usage_mb']}MB")
    return lines


async def test_snippet_check_queue_health_good(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    for job in [await submit(client, params={"steps": 1}) for _ in range(2)]:
        await wait_terminal(client, job["id"])
    stats = await asyncio.to_thread(compileo["check_queue_health"])
    assert (stats["completed_jobs"], stats["failed_jobs"], stats["total_jobs"]) == (2, 0, 2)
    assert (stats["pending_jobs"], stats["running_jobs"], stats["active_workers"]) == (0, 0, 1)
    assert stats["queue_health"]["status"] == "healthy"
    assert stats["memory_usage_mb"] > 10
    alerts = resource_alerts(stats)
    expected = (
        ["Queue health: WARNING", *alerts]
        if alerts
        else ["Queue health: GOOD", "Active jobs: 0", "Workers: 1"]
    )
    assert capsys.readouterr().out.splitlines() == expected


async def test_snippet_check_queue_health_warns(
    client: httpx.AsyncClient,
    worker_settings: WorkerSettings,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        for job in [await submit(client, params={"steps": 1, "fail": True}) for _ in range(2)]:
            await wait_terminal(client, job["id"])
    finally:
        await runner.stop()
    batch = await client.post("/api/v1/jobs/batch", json={"type": "noop", "items": [{}] * 11})
    assert batch.status_code == 202, batch.text  # no worker: its 11 children wait
    stats = await asyncio.to_thread(compileo["check_queue_health"])
    assert (stats["failed_jobs"], stats["pending_jobs"], stats["total_jobs"]) == (2, 11, 13)
    assert stats["active_workers"] == 0
    assert stats["queue_health"]["status"] == "unhealthy"
    assert capsys.readouterr().out.splitlines() == [
        "Queue health: WARNING",
        "  - High failure rate: 2/13 jobs failed",
        *resource_alerts(stats),
        "  - Large pending queue: 11 jobs waiting",
    ]


async def test_snippet_check_queue_health_without_server(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = snippets(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert await asyncio.to_thread(namespace["check_queue_health"]) is None
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("Failed to check queue health: HTTPConnectionPool(host='127.0.0.1'"), line
    assert "Connection refused" in line


@pytest.mark.slow
async def test_snippet_adaptive_polling(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = await submit(client, params={"steps": 4, "duration_s": 2.0})
    final = await asyncio.to_thread(compileo["adaptive_polling"], job["id"], 0.2, 1.0)
    check_status_view(final, job["id"])
    assert final["status"] == "completed"
    assert final["result"] == {"steps": 4, "duration_s": 2.0, "delivery": 1}
    lines = capsys.readouterr().out.splitlines()
    checks = [re.fullmatch(r"Progress: (\d+\.\d)% - Next check in (\d+\.\d)s", line) for line in lines]
    assert all(checks), lines
    seen = [(float(m[1]), float(m[2])) for m in checks if m]
    assert seen[-1][0] == 100.0
    progress = [p for p, _ in seen]
    assert progress == sorted(progress)
    assert len(set(progress)) >= 3, lines  # it saw the steps on the way
    assert all(0.2 <= interval <= 1.0 for _, interval in seen), lines
    # a jump of more than 5 % halves the interval (down to the initial one); else it grows by 1.2x
    for (before, last), (now, interval) in itertools.pairwise(seen):
        assert interval <= last if now - before > 5 else interval >= last, lines


async def test_snippet_adaptive_polling_unknown_job(compileo: dict[str, Any]) -> None:
    """The snippet reads `progress` from whatever comes back: a 404 body has none."""
    with pytest.raises(KeyError, match="progress"):
        await asyncio.to_thread(compileo["adaptive_polling"], UNKNOWN_JOB, 0.2, 1.0)


@pytest.mark.slow
async def test_snippet_monitor_multiple_jobs(
    api: ApiServer,
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = faster(compileo, poll_interval=0.05)
    ok = await submit(client, params={"steps": 2, "duration_s": 0.4})
    bad = await submit(client, params={"steps": 1, "fail": True, "error": "boom"})
    ids = [ok["id"], bad["id"], UNKNOWN_JOB]
    results = await asyncio.wait_for(asyncio.to_thread(compileo["monitor_multiple_jobs"], ids), 30)
    assert sorted(calls) == sorted(ids)
    assert set(results) == set(ids)
    check_status_view(results[ok["id"]], ok["id"])
    assert results[ok["id"]]["status"] == "completed"
    assert results[ok["id"]]["result"] == {"steps": 2, "duration_s": 0.4, "delivery": 1}
    assert (results[bad["id"]]["status"], results[bad["id"]]["error"]) == ("failed", "boom")
    # the unknown one: 60 polls that got 404, then monitor_job_completion's TimeoutError
    assert results[UNKNOWN_JOB] == {"error": f"Job {UNKNOWN_JOB} did not complete within 3.0 seconds"}
    lines = capsys.readouterr().out.splitlines()
    not_found = f"Error polling job status: 404 Client Error: Not Found for url: {api.url}/api/v1/jobs/status/{UNKNOWN_JOB}"
    assert lines.count(not_found) == 60
    assert f"Job {ok['id']}: completed - 100.0% - completed" in lines
    assert f"Job {bad['id']}: failed - 100.0% - failed" in lines


@pytest.mark.slow
async def test_snippet_submit_and_monitor_job(
    api: ApiServer, client: httpx.AsyncClient, compileo: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Its job id is hard-coded ("example-job-id-from-submission"): no server has that job, so it
    polls 60 times, gets 404 each time and ends in monitor_job_completion's TimeoutError."""
    job_id = "example-job-id-from-submission"
    calls = faster(compileo, poll_interval=0.05)
    with pytest.raises(TimeoutError, match=f"^Job {job_id} did not complete within 3.0 seconds$"):
        await asyncio.to_thread(compileo["submit_and_monitor_job"], "document_processing", {})
    assert calls == [job_id]
    lines = capsys.readouterr().out.splitlines()
    error = f"Error polling job status: 404 Client Error: Not Found for url: {api.url}/api/v1/jobs/status/{job_id}"
    assert lines == [f"Monitoring job {job_id}...", *[error] * 60]
    response = await client.get(f"/api/v1/jobs/status/{job_id}")
    assert response.json() == {"status_code": 404, "detail": f"job {job_id} not found"}


async def test_snippet_resilient_session(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 1})
    await wait_terminal(client, job["id"])
    namespace: dict[str, Any] = {"__name__": "compileo_snippets", "job_id": job["id"]}
    await asyncio.to_thread(exec, RESILIENT_SESSION.replace("http://localhost:8000", api.url), namespace)
    session = namespace["session"]
    try:
        response = namespace["response"]
        assert response.status_code == 200
        check_status_view(response.json(), job["id"])
        assert response.json()["status"] == "completed"
        again = await asyncio.to_thread(session.get, f"{api.url}/api/v1/jobs/status/{UNKNOWN_JOB}")
        assert again.status_code == 404  # not one of the statuses it retries
        assert again.json()["detail"] == f"job {UNKNOWN_JOB} not found"
    finally:
        session.close()
