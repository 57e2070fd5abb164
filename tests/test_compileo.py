"""The Compileo jobs API (seed 004): status, long-poll and status stream, and the document's own
Python client snippets run unchanged (but for the base URL) against real jobs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import ApiServer, WorkerRunner, replace, submit, wait_terminal
from tests.test_admin import wait_for
from tests.test_buffers import metric
from workers import WorkerSettings

STATUS_KEYS = {
    "job_id", "status", "progress", "current_step", "result", "error",
    "created_at", "started_at", "completed_at", "updated_at",
}  # fmt: skip
STREAM_KEYS = {"job_id", "status", "progress", "current_step", "timestamp"}
COMPILEO_STATUSES = {"pending", "running", "completed", "failed", "cancelled"}
FINISHED = {"completed", "failed", "cancelled"}

# Copied verbatim from the document ("Best Practices" and "Error Handling and Recovery").
SNIPPETS = r'''
import requests
import time

def monitor_job_completion(job_id, max_attempts=60, poll_interval=5):
    """Monitor job until completion with exponential backoff."""
    attempt = 0

    while attempt < max_attempts:
        try:
            response = requests.get(f'http://localhost:8000/api/v1/jobs/status/{job_id}')
            response.raise_for_status()

            job_status = response.json()

            print(f"Job {job_id}: {job_status['status']} - {job_status['progress']:.1f}% - {job_status['current_step']}")

            if job_status['status'] in ['completed', 'failed', 'cancelled']:
                return job_status

            # Exponential backoff with jitter
            sleep_time = min(poll_interval * (2 ** attempt), 30)  # Max 30 seconds
            time.sleep(sleep_time)
            attempt += 1

        except requests.exceptions.RequestException as e:
            print(f"Error polling job status: {e}")
            time.sleep(poll_interval)
            attempt += 1

    raise TimeoutError(f"Job {job_id} did not complete within {max_attempts * poll_interval} seconds")


def wait_for_job_change(job_id, current_status=None, timeout=30):
    """Wait for job status change using long polling."""
    params = {'timeout': timeout}
    if current_status:
        params['current_status'] = current_status

    response = requests.get(
        f'http://localhost:8000/api/v1/jobs/status/{job_id}/poll',
        params=params
    )
    response.raise_for_status()

    return response.json()


import json
import requests

def stream_job_updates(job_id):
    """Stream real-time job updates using server-sent events."""
    response = requests.get(
        f'http://localhost:8000/api/v1/jobs/status/{job_id}/stream',
        stream=True
    )

    for line in response.iter_lines():
        if line.startswith(b'data: '):
            data = line[6:].decode('utf-8')  # Remove 'data: ' prefix
            try:
                update = json.loads(data)
                print(f"Job Update: {update}")

                # Handle different update types
                if 'error' in update:
                    print(f"Error: {update['error']}")
                    break
                elif update.get('status') in ['completed', 'failed', 'cancelled']:
                    print("Job finished")
                    break

            except json.JSONDecodeError:
                continue


def monitor_job_with_recovery(job_id):
    """Monitor job with automatic error recovery."""
    try:
        # First, try to get initial status
        status_response = requests.get(f'http://localhost:8000/api/v1/jobs/status/{job_id}')
        status_response.raise_for_status()
        job_status = status_response.json()

        # If job failed, try to restart
        if job_status['status'] == 'failed':
            print(f"Job {job_id} failed: {job_status.get('error', 'Unknown error')}")
            restart_response = requests.post(f'http://localhost:8000/api/v1/jobs/restart/{job_id}')
            if restart_response.status_code == 200:
                print("Job restarted successfully")
                return monitor_job_completion(job_id)
            else:
                print("Failed to restart job")

        # If job is cancelled, ask user if they want to restart
        elif job_status['status'] == 'cancelled':
            user_input = input(f"Job {job_id} was cancelled. Restart? (y/n): ")
            if user_input.lower() == 'y':
                restart_response = requests.post(f'http://localhost:8000/api/v1/jobs/restart/{job_id}')
                if restart_response.status_code == 200:
                    return monitor_job_completion(job_id)

        # For running or pending jobs, monitor normally
        elif job_status['status'] in ['running', 'pending']:
            return monitor_job_completion(job_id)

        # For completed jobs, return status
        elif job_status['status'] == 'completed':
            return job_status

    except requests.exceptions.HTTPError as e:
        if e.response.status_code == 404:
            print(f"Job {job_id} not found")
        else:
            print(f"HTTP error: {e}")
    except requests.exceptions.ConnectionError:
        print("Connection error - check if API server is running")
    except Exception as e:
        print(f"Unexpected error: {e}")

    return None
'''


@pytest.fixture
def compileo(api: ApiServer) -> dict[str, Any]:
    """The document's functions, talking to this test's API."""
    namespace: dict[str, Any] = {"__name__": "compileo_snippets"}
    exec(SNIPPETS.replace("http://localhost:8000", api.url), namespace)
    return namespace


def faster(namespace: dict[str, Any], poll_interval: float = 0.2) -> list[str]:
    """Make the snippets' own calls of `monitor_job_completion` use a short poll interval (the
    document's default, 5 s, would only slow the tests down); returns the ids it was called with."""
    original: Callable[..., Any] = namespace["monitor_job_completion"]
    calls: list[str] = []

    def monitor_job_completion(job_id: str, **kwargs: Any) -> Any:
        calls.append(job_id)
        kwargs.setdefault("poll_interval", poll_interval)
        return original(job_id, **kwargs)

    namespace["monitor_job_completion"] = monitor_job_completion
    return calls


def check_status_view(body: dict[str, Any], job_id: str) -> None:
    """The Compileo status shape, exactly."""
    assert set(body) == STATUS_KEYS, body
    assert body["job_id"] == job_id
    assert body["status"] in COMPILEO_STATUSES
    assert isinstance(body["progress"], float)
    assert isinstance(body["current_step"], str)
    datetime.fromisoformat(body["created_at"])
    datetime.fromisoformat(body["updated_at"])
    for key in ("started_at", "completed_at"):
        if body[key] is not None:
            datetime.fromisoformat(body[key])


async def long_poll_open(client: httpx.AsyncClient) -> bool:
    """Whether the API counts one long-poll as open: it is subscribed, so no change is missed."""
    return await metric(client, "jobcast_open_streams") == 1


async def compileo_status(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/jobs/status/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    check_status_view(body, job_id)
    return body


async def wait_native_status(client: httpx.AsyncClient, job_id: str, status: str, timeout: float = 8) -> None:
    """Until jobcast's own view of the job has `status`."""
    async with asyncio.timeout(timeout):
        job = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        while job["status"] != status:
            response = await client.get(
                f"/api/v1/jobs/{job_id}/poll", params={"timeout": timeout, "since": job["last_event_id"]}
            )
            job = response.json()


async def read_stream(client: httpx.AsyncClient, job_id: str, timeout: float = 8) -> list[dict[str, Any]]:
    """Every message of the status stream, until the server ends it."""
    updates: list[dict[str, Any]] = []
    async with (
        asyncio.timeout(timeout),
        client.stream("GET", f"/api/v1/jobs/status/{job_id}/stream") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line or line.startswith(":"):
                continue  # message separators and keep-alive comments
            assert line.startswith("data: "), line
            updates.append(json.loads(line[len("data: ") :]))
    for update in updates:
        assert STREAM_KEYS <= set(update) <= STREAM_KEYS | {"result", "error"}, update
        assert update["job_id"] == job_id
        assert update["status"] in COMPILEO_STATUSES
        datetime.fromisoformat(update["timestamp"])
        assert ("error" in update) == (update["status"] == "failed"), update
    progress = [update["progress"] for update in updates]
    assert progress == sorted(progress), progress
    assert updates
    assert all(update["status"] not in FINISHED for update in updates[:-1]), updates
    return updates


# --- GET /status/{id} ---------------------------------------------------------------------


async def test_status_of_pending_job(client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"steps": 1})
    body = await compileo_status(client, job["id"])
    assert body["status"] == "pending"
    assert body["progress"] == 0.0
    assert body["current_step"] == "queued"
    assert body["result"] is None
    assert body["error"] is None
    assert body["started_at"] is None
    assert body["completed_at"] is None
    assert body["created_at"].endswith("Z")


async def test_status_of_finished_jobs(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    ok = await submit(client, params={"steps": 2})
    bad = await submit(client, params={"steps": 2, "fail": True, "error": "boom"})
    await wait_terminal(client, ok["id"], timeout=8)
    await wait_terminal(client, bad["id"], timeout=8)

    done = await compileo_status(client, ok["id"])
    assert done["status"] == "completed"
    assert done["progress"] == 100.0
    assert done["result"] == {"steps": 2, "duration_s": 0.0, "delivery": 1}
    assert done["error"] is None
    assert done["started_at"] is not None
    assert done["completed_at"] is not None

    failed = await compileo_status(client, bad["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "boom"
    assert failed["result"] is None
    assert failed["completed_at"] is not None


async def test_unknown_job_is_404_on_every_route(client: httpx.AsyncClient) -> None:
    job_id = "123e4567-e89b-12d3-a456-426614174000"
    for suffix in ("", "/poll", "/stream"):
        response = await client.get(f"/api/v1/jobs/status/{job_id}{suffix}")
        assert response.status_code == 404, suffix
        assert response.json() == {"status_code": 404, "detail": f"job {job_id} not found"}


@pytest.mark.slow
async def test_retrying_job_is_running_in_compileo_terms(
    client: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    """Compileo has no `retrying`: a job waiting for its next attempt reads, polls and streams as
    running, and a poll that knows it is running waits."""
    runner = WorkerRunner(replace(worker_settings, retry_base_s=8.0))  # next attempt in 4-8 s
    await runner.start()
    try:
        job = await submit(client, params={"steps": 1, "fail_times": 1, "error": "flaky"})
        await wait_native_status(client, job["id"], "retrying")

        body = await compileo_status(client, job["id"])
        assert body["status"] == "running"
        assert body["current_step"].startswith("retrying in ")
        assert "flaky" in body["current_step"]
        assert body["error"] is None or "flaky" in body["error"]

        started = time.monotonic()
        response = await client.get(
            f"/api/v1/jobs/status/{job['id']}/poll", params={"timeout": 1, "current_status": "running"}
        )
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        polled = response.json()
        check_status_view(polled, job["id"])
        assert polled["status"] == "running"
        assert elapsed >= 0.9, f"returned after {elapsed:.2f} s although the status did not change"

        async with (
            asyncio.timeout(5),
            client.stream("GET", f"/api/v1/jobs/status/{job['id']}/stream") as stream,
        ):
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    first = json.loads(line[len("data: ") :])
                    break
        assert first["status"] == "running"
        assert "error" not in first
    finally:
        await runner.stop()


# --- GET /status/{id}/poll ------------------------------------------------------------------


@pytest.mark.slow
async def test_poll_timeout_must_be_1_to_300(client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"steps": 1})
    url = f"/api/v1/jobs/status/{job['id']}/poll"
    for timeout in ("0", "0.5", "301", "-1", "soon"):
        response = await client.get(url, params={"timeout": timeout})
        assert response.status_code == 400, (timeout, response.text)
        body = response.json()
        assert body["status_code"] == 400
        assert [item["key"] for item in body["extra"]] == ["timeout"], body
    for timeout in ("1", "300"):  # the bounds are allowed; a known-stale status answers at once
        response = await client.get(url, params={"timeout": timeout, "current_status": "running"})
        assert response.status_code == 200, (timeout, response.text)
        check_status_view(response.json(), job["id"])


@pytest.mark.slow
async def test_poll_returns_at_timeout_with_status_shape(client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"steps": 1})
    url = f"/api/v1/jobs/status/{job['id']}/poll"
    for params in ({"timeout": 1, "current_status": "pending"}, {"timeout": 1}):
        started = time.monotonic()
        response = await client.get(url, params=params)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        body = response.json()
        check_status_view(body, job["id"])
        assert body["status"] == "pending"
        assert 0.9 <= elapsed < 3, elapsed


async def test_poll_returns_at_once_when_status_already_differs(client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"steps": 1})
    started = time.monotonic()
    response = await client.get(
        f"/api/v1/jobs/status/{job['id']}/poll", params={"timeout": 30, "current_status": "running"}
    )
    assert time.monotonic() - started < 1
    body = response.json()
    check_status_view(body, job["id"])
    assert body["status"] == "pending"


async def test_poll_returns_on_change(client: httpx.AsyncClient, worker_settings: WorkerSettings) -> None:
    job = await submit(client, params={"steps": 1})
    url = f"/api/v1/jobs/status/{job['id']}/poll"
    started = time.monotonic()
    poll = asyncio.create_task(client.get(url, params={"timeout": 20, "current_status": "pending"}))
    await wait_for(lambda: long_poll_open(client))
    assert not poll.done()
    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        response = await asyncio.wait_for(poll, 8)
        assert time.monotonic() - started < 8
        body = response.json()
        check_status_view(body, job["id"])
        assert body["status"] in {"running", "completed"}
        assert body["started_at"] is not None
        done = await wait_terminal(client, job["id"], timeout=8)
        assert done["status"] == "completed"
    finally:
        await runner.stop()


# --- GET /status/{id}/stream ----------------------------------------------------------------


@pytest.mark.slow
async def test_stream_follows_job_to_completion(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 4, "duration_s": 0.8})
    updates = await read_stream(client, job["id"])
    assert len(updates) >= 2
    assert updates[0]["status"] in {"pending", "running"}
    last = updates[-1]
    assert last["status"] == "completed"
    assert last["progress"] == 100.0
    assert last["current_step"] == "completed"
    assert all("error" not in update for update in updates)
    assert any(update["status"] == "running" for update in updates)
    assert {update["current_step"] for update in updates} >= {"step 4 of 4", "completed"}


async def test_stream_of_failed_job_ends_with_error(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 2, "duration_s": 0.4, "fail": True, "error": "boom"})
    updates = await read_stream(client, job["id"])
    assert updates[-1]["status"] == "failed"
    assert updates[-1]["error"] == "boom"
    assert all("error" not in update for update in updates[:-1])


async def test_stream_of_retried_job_never_says_retrying(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 1, "fail_times": 1, "error": "flaky"})
    updates = await read_stream(client, job["id"])
    assert updates[-1]["status"] == "completed"
    assert updates[-1]["result"] == {"steps": 1, "duration_s": 0.0, "delivery": 2}
    assert all("error" not in update for update in updates)


async def test_stream_of_finished_job_is_one_message(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 2})
    await wait_terminal(client, job["id"], timeout=8)
    updates = await read_stream(client, job["id"], timeout=3)
    assert len(updates) == 1
    assert updates[0]["status"] == "completed"
    assert updates[0]["progress"] == 100.0


# --- the document's Python snippets ---------------------------------------------------------


@pytest.mark.slow
async def test_snippet_monitor_job_completion(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monitor = compileo["monitor_job_completion"]
    job = await submit(client, params={"steps": 3, "duration_s": 0.3})
    final = await asyncio.to_thread(monitor, job["id"], poll_interval=0.2)
    check_status_view(final, job["id"])
    assert final["status"] == "completed"
    assert final["result"] == {"steps": 3, "duration_s": 0.3, "delivery": 1}
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"Job {job['id']}: completed - 100.0% - completed"
    assert all(line.startswith(f"Job {job['id']}: ") for line in lines)

    bad = await submit(client, params={"steps": 1, "fail": True, "error": "boom"})
    final = await asyncio.to_thread(monitor, bad["id"], poll_interval=0.2)
    assert final["status"] == "failed"
    assert final["error"] == "boom"
    assert capsys.readouterr().out.splitlines()[-1] == f"Job {bad['id']}: failed - 100.0% - failed"


@pytest.mark.slow
async def test_snippet_monitor_job_completion_gives_up(
    client: httpx.AsyncClient, compileo: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job = await submit(client, params={"steps": 1})  # no worker: it stays pending
    with pytest.raises(TimeoutError, match=f"Job {job['id']} did not complete within 0.2 seconds"):
        await asyncio.to_thread(
            compileo["monitor_job_completion"], job["id"], max_attempts=2, poll_interval=0.1
        )
    assert capsys.readouterr().out.splitlines() == [f"Job {job['id']}: pending - 0.0% - queued"] * 2


@pytest.mark.slow
async def test_snippet_wait_for_job_change(
    client: httpx.AsyncClient, worker_settings: WorkerSettings, compileo: dict[str, Any]
) -> None:
    wait_for_job_change = compileo["wait_for_job_change"]
    job = await submit(client, params={"steps": 2, "duration_s": 0.2})

    started = time.monotonic()
    same = await asyncio.to_thread(wait_for_job_change, job["id"], "pending", 1)
    assert time.monotonic() - started >= 0.9
    check_status_view(same, job["id"])
    assert same["status"] == "pending"

    started = time.monotonic()
    stale = await asyncio.to_thread(wait_for_job_change, job["id"], "running", 30)
    assert time.monotonic() - started < 1
    assert stale["status"] == "pending"

    runner = WorkerRunner(worker_settings)
    changing = asyncio.create_task(asyncio.to_thread(wait_for_job_change, job["id"], "pending", 20))
    await wait_for(lambda: long_poll_open(client))  # so the change comes while it waits
    await runner.start()
    try:
        changed = await asyncio.wait_for(changing, 8)
        check_status_view(changed, job["id"])
        assert changed["status"] in {"running", "completed"}
        final = await asyncio.to_thread(wait_for_job_change, job["id"], "running", 10)
        if final["status"] == "running":  # progress events do not count as a change
            final = await asyncio.to_thread(wait_for_job_change, job["id"], "running", 10)
        assert final["status"] == "completed"
        assert final["progress"] == 100.0
    finally:
        await runner.stop()


@pytest.mark.slow
async def test_snippet_stream_job_updates(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream_job_updates = compileo["stream_job_updates"]
    job = await submit(client, params={"steps": 3, "duration_s": 0.3})
    assert await asyncio.wait_for(asyncio.to_thread(stream_job_updates, job["id"]), 8) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "Job finished"
    assert all(line.startswith("Job Update: {") for line in lines[:-1]), lines
    assert f"'job_id': '{job['id']}'" in lines[-2]
    assert "'status': 'completed'" in lines[-2]
    assert "'progress': 100.0" in lines[-2]
    assert not any(line.startswith("Error: ") for line in lines)

    bad = await submit(client, params={"steps": 2, "duration_s": 0.2, "fail": True, "error": "boom"})
    assert await asyncio.wait_for(asyncio.to_thread(stream_job_updates, bad["id"]), 8) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "Error: boom"
    assert "'status': 'failed'" in lines[-2]
    assert "Job finished" not in lines
    assert sum(line.startswith("Error: ") for line in lines) == 1


@pytest.mark.slow
async def test_snippet_monitor_job_with_recovery_completed(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = faster(compileo)
    job = await submit(client, params={"steps": 2})
    await wait_terminal(client, job["id"], timeout=8)
    final = await asyncio.to_thread(compileo["monitor_job_with_recovery"], job["id"])
    check_status_view(final, job["id"])
    assert final["status"] == "completed"
    assert final["result"] == {"steps": 2, "duration_s": 0.0, "delivery": 1}
    assert calls == []
    assert capsys.readouterr().out == ""


@pytest.mark.slow
async def test_snippet_monitor_job_with_recovery_running(
    client: httpx.AsyncClient,
    worker: WorkerRunner,
    compileo: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = faster(compileo)
    job = await submit(client, params={"steps": 5, "duration_s": 1.0})
    await wait_native_status(client, job["id"], "running")
    final = await asyncio.wait_for(asyncio.to_thread(compileo["monitor_job_with_recovery"], job["id"]), 8)
    check_status_view(final, job["id"])
    assert final["status"] == "completed"
    assert final["progress"] == 100.0
    assert calls == [job["id"]]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"Job {job['id']}: running - ")
    assert lines[-1] == f"Job {job['id']}: completed - 100.0% - completed"


@pytest.mark.slow
async def test_snippet_monitor_job_with_recovery_unknown_job(
    client: httpx.AsyncClient, compileo: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = "123e4567-e89b-12d3-a456-426614174000"
    assert await asyncio.to_thread(compileo["monitor_job_with_recovery"], job_id) is None
    assert capsys.readouterr().out == f"Job {job_id} not found\n"
    assert (await client.get(f"/api/v1/jobs/status/{job_id}")).status_code == 404
