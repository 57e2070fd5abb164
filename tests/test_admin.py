"""Queue stats, worker heartbeats, admin routes and webhooks, against a real nats-server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import Settings
from streams import STREAM, CallbackResult, NatsServer, ProcessUsage, connect, decode_event, events_subject
from tests.conftest import ApiServer, WorkerRunner, spawned, submit, wait_terminal, worker_process
from tests.test_queue_stats import proc_rss_mb

STATS_KEYS = {
    "pending_jobs", "running_jobs", "scheduled_jobs", "completed_jobs", "failed_jobs", "cancelled_jobs",
    "retrying_jobs", "total_jobs", "queue_type", "cache_size", "cpu_usage_percent", "memory_usage_mb",
    "active_workers", "queue_health",
}  # fmt: skip


class Receiver:
    """A tiny HTTP server that records POSTs and answers with scripted status codes."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = {
            k.strip().lower(): v.strip()
            for k, v in (line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()


async def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    """Poll an async predicate until it returns something truthy."""
    async with asyncio.timeout(timeout):
        while not (value := await predicate()):  # noqa: ASYNC110 - polling over HTTP
            await asyncio.sleep(0.05)
        return value


async def test_queue_stats_shape_and_counts(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    done = await submit(client, params={"steps": 1})
    failed = await submit(client, params={"fail": True})
    batch = await client.post(
        "/api/v1/jobs/batch", json={"type": "noop", "items": [{}] * 3, "params": {"steps": 1}}
    )
    assert batch.status_code == 202, batch.text
    for job_id in (done["id"], failed["id"], batch.json()["id"]):
        await wait_terminal(client, job_id)
    stats = (await client.get("/api/v1/jobs/queue/stats")).json()
    assert set(stats) == STATS_KEYS
    assert stats["completed_jobs"] == 4  # a batch of 3 counts as its 3 children, not as 4 jobs
    assert stats["failed_jobs"] == 1
    assert stats["total_jobs"] == 5
    assert stats["pending_jobs"] == stats["running_jobs"] == 0
    assert stats["queue_type"] == "nats-jetstream"
    assert stats["active_workers"] == 1
    # the test process is the API and the worker: one process, on one machine, counted once
    rss_mb = proc_rss_mb()
    assert 0.9 * rss_mb <= stats["memory_usage_mb"] <= 1.1 * rss_mb, (stats["memory_usage_mb"], rss_mb)
    assert 0 <= stats["cpu_usage_percent"] <= 100
    health = stats["queue_health"]
    assert health["cpu_cores"] == pytest.approx(ProcessUsage().cpus(), abs=0.01)
    assert health["status"] == "healthy"
    assert health["pools"] == {"cpu": "healthy", "gpu": "healthy", "llm": "healthy"}
    assert health["limit_enforcement"] == "active"
    assert (health["busy_slots"], health["total_slots"]) == (0, 1)


@pytest.mark.slow
async def test_workers_come_and_go(
    client: httpx.AsyncClient, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBCAST_WORKER_TTL_S", "2")

    async def active() -> int:
        count: int = (await client.get("/api/v1/jobs/queue/stats")).json()["active_workers"]
        return count

    assert await active() == 0
    argv, env = worker_process(nats_server.url)
    async with spawned(argv, env) as proc:  # type: ignore[arg-type]
        await wait_for(lambda: _equals(active, 1))
        status = (await client.get("/api/v1/jobs/admin/queue-status")).json()
        (seen,) = status["workers"]
        assert seen["pool"] == "cpu"
        assert seen["pid"] == proc.pid
        assert seen["running"] == []
        os.killpg(proc.pid, signal.SIGKILL)
        started = time.monotonic()
        await wait_for(lambda: _equals(active, 0), timeout=10)
        assert time.monotonic() - started < 6, "a dead worker's heartbeat outlived its TTL"
    # a worker that stops cleanly deregisters at once
    runner = WorkerRunner(_cpu_settings(nats_server.url))
    await runner.start()
    assert await wait_for(lambda: _equals(active, 1))
    await runner.stop()
    assert await active() == 0


async def _equals(get: Any, value: int) -> bool:
    result: bool = await get() == value
    return result


def _cpu_settings(url: str) -> Any:
    from workers import WorkerSettings

    return WorkerSettings(pool="cpu", nats_url=url, ack_wait_s=2, grace_s=2, name="second")


@pytest.mark.slow
async def test_queue_status_shows_pending_and_the_running_job(
    client: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    for _ in range(3):
        await submit(client, params={"steps": 1})
    status = (await client.get("/api/v1/jobs/admin/queue-status")).json()
    assert status["pending_by_type"] == {"noop": 3}
    assert status["pending_by_pool"] == {"cpu": 3}
    assert status["workers"] == []
    long = await submit(client, params={"steps": 4, "duration_s": 2}, priority=5)
    runner = WorkerRunner(_cpu_settings(nats_server.url))
    await runner.start()
    try:

        async def running_job() -> list[str]:
            workers = (await client.get("/api/v1/jobs/admin/queue-status")).json()["workers"]
            return [job for w in workers for job in w["running"]]

        assert await wait_for(running_job) == [long["id"]]
    finally:
        await runner.stop()


async def test_admin_all_statistics_and_exhausted(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    ok = [await submit(client, params={"steps": 1, "duration_s": 0.05}) for _ in range(3)]
    gave_up = await submit(client, params={"fail_times": 5}, max_attempts=1)
    bad = await submit(client, params={"fail": True, "error": "bad input"})
    for job in [*ok, gave_up, bad]:
        await wait_terminal(client, job["id"])

    page = (await client.get("/api/v1/jobs/admin/all", params={"limit": 2})).json()
    assert page["total"] == 5
    assert [j["id"] for j in page["items"]] == [bad["id"], gave_up["id"]]
    exhausted = (await client.get("/api/v1/jobs/admin/all", params={"exhausted": "true"})).json()
    assert [j["id"] for j in exhausted["items"]] == [gave_up["id"]]
    assert "gave up after 1" in exhausted["items"][0]["error"]
    failed = (await client.get("/api/v1/jobs/admin/all", params={"status": "failed"})).json()
    assert {j["id"] for j in failed["items"]} == {gave_up["id"], bad["id"]}

    statistics = (await client.get("/api/v1/jobs/admin/statistics")).json()
    assert set(statistics) == {"totals", "by_type", "queue"}
    noop = statistics["by_type"]["noop"]
    assert statistics["totals"] == noop  # one type: the totals are its figures
    assert noop["total"] == 5
    assert noop["counts"] == {"completed": 3, "failed": 2}
    assert noop["success_rate"] == 0.6
    assert noop["failure_rate"] == 0.4
    assert 0.04 < noop["p50_run_s"] <= noop["p95_run_s"] < 5
    assert noop["avg_run_s"] > 0
    assert noop["avg_queue_wait_s"] >= 0


@pytest.mark.slow
async def test_force_complete_and_cleanup(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    running = await submit(client, params={"steps": 20, "duration_s": 20})

    async def is_running() -> bool:
        return bool((await client.get(f"/api/v1/jobs/{running['id']}")).json()["status"] == "running")

    await wait_for(is_running)
    forced = await client.post(
        f"/api/v1/jobs/admin/{running['id']}/force-complete", json={"result": {"by": "admin"}}
    )
    assert forced.status_code == 200
    assert forced.json()["status"] == "completed"
    assert forced.json()["result"] == {"by": "admin"}
    again = await client.post(f"/api/v1/jobs/admin/{running['id']}/force-complete", json={})
    assert again.status_code == 409
    assert "already completed" in again.json()["detail"]
    missing = await client.post("/api/v1/jobs/admin/nope/force-complete", json={})
    assert missing.json() == {"status_code": 404, "detail": "job nope not found"}

    failed = await submit(client, params={"fail": True})
    cancelled = await submit(client, params={"steps": 20, "duration_s": 20}, priority=-1)
    await client.post(f"/api/v1/jobs/{cancelled['id']}/cancel")
    await wait_terminal(client, failed["id"])
    await wait_terminal(client, cancelled["id"])

    async def released() -> bool:
        job = (await client.get(f"/api/v1/jobs/{running['id']}")).json()
        return job["held_by"] is None

    await wait_for(released)
    kept = (await client.delete("/api/v1/jobs/admin/cleanup", params={"days_old": 30})).json()
    none = {"deleted": 0, "completed": 0, "cancelled": 0, "failed": 0, "files": 0}
    assert kept == {"days_old": 30, **none, "failed_kept": 0}
    report = (await client.delete("/api/v1/jobs/admin/cleanup", params={"days_old": 0})).json()
    assert report == {"days_old": 0, **none, "deleted": 2, "completed": 1, "cancelled": 1, "failed_kept": 1}
    left = (await client.get("/api/v1/jobs")).json()
    assert [j["id"] for j in left["items"]] == [failed["id"]]
    report = (
        await client.delete("/api/v1/jobs/admin/cleanup", params={"days_old": 0, "failed_days_old": 0})
    ).json()
    assert report == {"days_old": 0, **none, "deleted": 1, "failed": 1, "failed_kept": 0}
    assert (await client.get("/api/v1/jobs")).json()["items"] == []
    assert (await client.delete("/api/v1/jobs/admin/cleanup", params={"days_old": -1})).status_code == 400


async def callback_result(nats_server: NatsServer, job_id: str) -> CallbackResult:
    """The `callback` event the sending API published for a job, read from the stream."""
    nc = await connect(nats_server.url, name="test")
    try:
        event = decode_event((await nc.jetstream().get_last_msg(STREAM, events_subject(job_id))).data or b"")
    finally:
        await nc.close()
    assert isinstance(event, CallbackResult)
    return event


async def test_webhook_signed_and_retried(
    client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings, nats_server: NatsServer
) -> None:
    async with Receiver([500, 503, 200]) as hook:
        job = await submit(client, params={"steps": 1}, callback_url=hook.url)
        assert job["callback_status"] == "pending"

        async def delivered() -> dict[str, Any] | None:
            body: dict[str, Any] = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
            return body if body["callback_status"] == "delivered" else None

        final = await wait_for(delivered)
    assert len(hook.requests) == 3
    headers, body = hook.requests[-1]
    key = (settings.data_dir / "webhook-secret").read_text().strip().encode()
    assert headers["x-jobcast-signature"] == "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert headers["x-jobcast-event"] == "job.completed"
    sent = json.loads(body)
    assert sent["id"] == job["id"]
    assert sent["status"] == "completed"
    assert sent["result"] == final["result"]
    result = await callback_result(nats_server, job["id"])
    assert (result.delivered, result.tries, result.error, result.http_status) == (True, 3, "", 200)


@pytest.mark.slow
async def test_webhook_gives_up_after_five_tries(
    client: httpx.AsyncClient, worker: WorkerRunner, nats_server: NatsServer
) -> None:
    async with Receiver([500]) as hook:
        job = await submit(client, params={"fail": True, "error": "boom"}, callback_url=hook.url)

        async def settled() -> bool:
            status = (await client.get(f"/api/v1/jobs/{job['id']}")).json()["callback_status"]
            return bool(status == "failed")

        await wait_for(settled)
    assert len(hook.requests) == 5
    assert hook.requests[0][0]["x-jobcast-event"] == "job.failed"
    assert json.loads(hook.requests[0][1])["error"] == "boom"
    result = await callback_result(nats_server, job["id"])
    assert (result.delivered, result.tries, result.error, result.http_status) == (False, 5, "HTTP 500", 500)


@pytest.mark.slow
async def test_webhook_sent_once_by_two_api_instances(
    nats_server: NatsServer, tmp_path: Path, worker: WorkerRunner
) -> None:
    apis = [
        ApiServer(
            Settings(
                data_dir=tmp_path / f"api{i}",
                nats_url=nats_server.url,
                webhook_backoff_s=0.05,
                webhook_secret="s",
            )
        )
        for i in range(2)
    ]
    for api in apis:
        await api.start()
    try:
        async with Receiver([200]) as hook, httpx.AsyncClient(base_url=apis[0].url) as first:
            jobs = [await submit(first, params={"steps": 1}, callback_url=hook.url) for _ in range(5)]
            async with httpx.AsyncClient(base_url=apis[1].url) as second:
                for job in jobs:
                    for http in (first, second):

                        async def delivered(http: httpx.AsyncClient = http, job_id: str = job["id"]) -> bool:
                            status = (await http.get(f"/api/v1/jobs/{job_id}")).json()["callback_status"]
                            return bool(status == "delivered")

                        await wait_for(delivered)
            await asyncio.sleep(0.3)
        deliveries = [h["x-jobcast-delivery"] for h, _ in hook.requests]
        assert sorted(deliveries) == sorted(f"{job['id']}.1" for job in jobs)
    finally:
        for api in apis:
            await api.stop()


async def test_callback_url_must_be_http(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/jobs", json={"type": "noop", "callback_url": "file:///etc/passwd"})
    assert response.status_code == 400
    assert "callback_url" in response.text


@pytest.fixture
def settings(tmp_path: Path, nats_server: NatsServer) -> Settings:
    """Fast webhook retries for these tests."""
    return Settings(
        data_dir=tmp_path / "data", nats_url=nats_server.url, sse_ping_s=0.5, webhook_backoff_s=0.05,
        webhook_sweep_s=0.5,
    )  # fmt: skip
