"""Crash and restart: the API, workers and `jobcast serve` lose no job and no event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from app import Settings
from streams import STREAM, NatsServer, WorkerConsumer, close_quietly, connect, decode_event, events_subject
from tests.conftest import (
    ApiServer,
    WorkerRunner,
    free_port,
    spawned,
    submit,
    wait_terminal,
    worker_process,
)
from workers import WorkerSettings

pytestmark = pytest.mark.slow

JOB_FIELDS = ("id", "status", "result", "error", "attempt", "progress", "created_at", "completed_at",
              "last_event_id")  # fmt: skip


async def wait_until(
    client: httpx.AsyncClient, job_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """GET the job until `check` holds."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/api/v1/jobs/{job_id}")
            assert response.status_code == 200, response.text
            job: dict[str, Any] = response.json()
            if check(job):
                return job
            await asyncio.sleep(0.05)


def running(job: dict[str, Any]) -> bool:
    return bool(job["status"] == "running" and job["progress"] > 0)


async def sse_history(client: httpx.AsyncClient, job_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, envelope) of every event of a finished job, from the SSE endpoint."""
    events = []
    async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events") as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            events.append((int(sse.id), sse.event, json.loads(sse.data)))
    ids = [seq for seq, _, _ in events]
    assert ids == sorted(set(ids)), ids  # strictly increasing
    assert all(env["seq"] == seq and env["kind"] == kind for seq, kind, env in events)
    return events


async def wait_ready(url: str, timeout: float = 30) -> dict[str, Any]:
    """Poll /ready until 200."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http, asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = await http.get("/ready")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            await asyncio.sleep(0.1)


async def test_api_down_while_job_runs(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings
) -> None:
    job = await submit(client, params={"duration_s": 3, "steps": 6})
    before = await wait_until(client, job["id"], running)
    await api.stop()
    nc = await connect(settings.nats_url, name="test")  # watch the stream while the API is down
    try:
        async with asyncio.timeout(15):
            while True:
                last = await nc.jetstream().get_last_msg(STREAM, events_subject(job["id"]), direct=True)
                if decode_event(last.data or b"").kind == "completed":
                    break
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    await api.start()

    done = await wait_terminal(client, job["id"])
    assert done["status"] == "completed"
    assert done["progress"] == 100.0
    assert done["result"] == {"steps": 6, "duration_s": 3.0, "delivery": 1}
    events = await sse_history(client, job["id"])
    kinds = [kind for _, kind, _ in events]
    assert kinds[:2] == ["submitted", "started"], kinds
    assert kinds[-1] == "completed", kinds
    assert set(kinds[2:-1]) == {"progress"}, kinds
    assert kinds.count("progress") >= 3, kinds
    assert [seq for seq, _, _ in events if seq > before["last_event_id"]], "nothing after the API stopped"
    assert events[-1][0] == last.seq == done["last_event_id"]
    assert events[-1][2]["status"] == "completed"

    with contextlib.closing(sqlite3.connect(settings.data_dir / "jobcast.db")) as db:
        row = db.execute("SELECT status, progress, last_seq FROM jobs WHERE id = ?", (job["id"],)).fetchone()
        seqs = [
            s for (s,) in db.execute("SELECT seq FROM job_events WHERE job_id = ? ORDER BY seq", (job["id"],))
        ]
        (bookmark,) = db.execute("SELECT last_seq FROM projection_bookmark WHERE name = 'jobs'").fetchone()
    assert row == ("completed", 100.0, last.seq)
    assert seqs == [seq for seq, _, _ in events]
    assert bookmark == last.seq


async def test_worker_killed_job_redelivered(
    client: httpx.AsyncClient, nats_server: NatsServer, worker_settings: WorkerSettings
) -> None:
    job = await submit(client, params={"duration_s": 4, "steps": 8})
    async with spawned(*worker_process(nats_server.url)) as proc:  # type: ignore[arg-type]
        first = await wait_until(client, job["id"], running)
        os.killpg(proc.pid, signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    assert first["attempt"] == 1
    second = WorkerRunner(worker_settings)
    await second.start()
    try:
        done = await wait_terminal(client, job["id"])
    finally:
        await second.stop()

    assert done["status"] == "completed"
    assert done["attempt"] == 2
    assert done["worker"] == "test-worker"
    assert done["result"] == {"steps": 8, "duration_s": 4.0, "delivery": 2}
    events = await sse_history(client, job["id"])
    started = [env for _, kind, env in events if kind == "started"]
    assert [(env["attempt"], env["event"]["delivery"]) for env in started] == [(1, 1), (2, 2)]
    assert started[0]["event"]["worker"] != "test-worker"
    assert started[1]["event"]["worker"] == "test-worker"
    assert [kind for _, kind, _ in events].count("completed") == 1
    assert events[-1][1] == "completed"
    assert events[-1][2]["attempt"] == 2


async def test_long_job_not_redelivered_while_worker_lives(
    client: httpx.AsyncClient, worker: WorkerRunner, worker_settings: WorkerSettings
) -> None:
    # A second, idle worker would take the job if its ack_wait (2 s) ran out.
    idle = WorkerRunner(worker_settings)
    await idle.start()
    try:
        job = await submit(client, params={"duration_s": 7, "steps": 7})
        done = await wait_terminal(client, job["id"])
        info = await worker.worker.js.consumer_info(STREAM, WorkerConsumer("cpu").durable)  # type: ignore[union-attr]
    finally:
        await idle.stop()

    assert done["status"] == "completed"
    assert done["attempt"] == 1
    assert done["result"] == {"steps": 7, "duration_s": 7.0, "delivery": 1}
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0
    kinds = [kind for _, kind, _ in await sse_history(client, job["id"])]
    assert kinds.count("started") == 1
    assert kinds.count("completed") == 1
    assert kinds[-1] == "completed"


async def test_sigterm_lets_short_job_finish(client: httpx.AsyncClient, nats_server: NatsServer) -> None:
    job = await submit(client, params={"duration_s": 1, "steps": 4})
    async with spawned(*worker_process(nats_server.url)) as proc:  # type: ignore[arg-type]
        await wait_until(client, job["id"], running)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    done = await wait_terminal(client, job["id"], timeout=5)
    assert done["status"] == "completed"
    assert done["attempt"] == 1
    assert done["result"] == {"steps": 4, "duration_s": 1.0, "delivery": 1}
    kinds = [kind for _, kind, _ in await sse_history(client, job["id"])]
    assert "retrying" not in kinds
    assert kinds[-1] == "completed"


async def test_sigterm_requeues_job_longer_than_grace(
    client: httpx.AsyncClient, nats_server: NatsServer, worker_settings: WorkerSettings
) -> None:
    job = await submit(client, params={"duration_s": 4, "steps": 8})
    argv, env = worker_process(nats_server.url, JOBCAST_WORKER_GRACE_S="1")
    async with spawned(argv, env) as proc:  # type: ignore[arg-type]
        await wait_until(client, job["id"], running)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    retrying = await wait_until(client, job["id"], lambda j: j["status"] == "retrying", timeout=5)
    assert "shutting down" in retrying["error"]
    assert retrying["progress"] < 100

    second = WorkerRunner(worker_settings)
    await second.start()
    try:
        done = await wait_terminal(client, job["id"])
    finally:
        await second.stop()
    assert done["status"] == "completed"
    assert done["attempt"] == 2
    assert done["error"] is None
    assert done["result"] == {"steps": 8, "duration_s": 4.0, "delivery": 2}
    events = await sse_history(client, job["id"])
    kinds = [kind for _, kind, _ in events]
    assert kinds.count("started") == 2, kinds
    assert kinds.count("completed") == 1, kinds
    (retry,) = [env for _, kind, env in events if kind == "retrying"]
    assert retry["attempt"] == 1
    assert "shutting down" in retry["event"]["error"]
    assert kinds.index("retrying") < len(kinds) - 1 - kinds[::-1].index("started")


async def test_deleted_database_is_rebuilt(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings
) -> None:
    jobs = [
        await submit(client, params={"steps": 2}, title="a"),
        await submit(client, params={"steps": 1, "fail": True}, title="b"),
        await submit(client, params={"steps": 3}, title="c"),
    ]
    before = [await wait_terminal(client, job["id"]) for job in jobs]
    listed_before = (await client.get("/api/v1/jobs")).json()
    assert [j["status"] for j in before] == ["completed", "failed", "completed"]

    await api.stop()
    for suffix in ("", "-wal", "-shm"):
        (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)
    await api.start()
    ready = await wait_ready(api.url)
    assert ready["status"] == "ready"
    assert ready["applied_seq"] == ready["stream_seq"] > 0

    def fields(job: dict[str, Any]) -> dict[str, Any]:
        return {key: job[key] for key in JOB_FIELDS}

    after = [(await client.get(f"/api/v1/jobs/{job['id']}")).json() for job in jobs]
    assert [fields(j) for j in after] == [fields(j) for j in before]
    listed_after = (await client.get("/api/v1/jobs")).json()
    assert listed_after["total"] == listed_before["total"] == 3
    assert [fields(j) for j in listed_after["items"]] == [fields(j) for j in listed_before["items"]]
    assert [j["id"] for j in listed_after["items"]] == [job["id"] for job in reversed(jobs)]


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their command lines."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    result = {}
    for child in map(int, found.stdout.split()):
        with contextlib.suppress(OSError):
            result[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return result


def running_pids(pids: dict[int, str]) -> list[int]:
    """Those of `pids` that still exist."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


async def cpu_worker(serve_pid: int, not_pid: int = 0, timeout: float = 20) -> int:
    """Pid of serve's cpu worker child (other than `not_pid`)."""
    async with asyncio.timeout(timeout):
        while True:
            for pid, cmdline in children(serve_pid).items():
                if "worker --pool cpu" in cmdline and pid != not_pid:
                    return pid
            await asyncio.sleep(0.1)


async def test_serve_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "jobcast", "serve", "--port", str(port), "--data-dir", str(tmp_path / "d")]
    env = dict(os.environ, JOBCAST_WORKER_GRACE_S="2", JOBCAST_LOG_LEVEL="WARNING")
    seen: dict[int, str] = {}
    try:
        async with spawned(argv, env) as serve, httpx.AsyncClient(base_url=url, timeout=30) as client:
            try:
                assert (await wait_ready(url))["status"] == "ready"
                first = await submit(client, params={"steps": 2}, title="before kill")
                done = await wait_terminal(client, first["id"])
                assert done["status"] == "completed"
                assert done["result"]["steps"] == 2

                worker_pid = await cpu_worker(serve.pid)
                seen.update(children(serve.pid))
                for name in ("jobcast api", "nats-server", "worker --pool gpu", "worker --pool llm"):
                    assert any(name in cmd for cmd in seen.values()), (name, seen)
                os.kill(worker_pid, signal.SIGKILL)
                new_pid = await cpu_worker(serve.pid, not_pid=worker_pid)
                seen.update(children(serve.pid))
                second = await submit(client, params={"steps": 1}, title="after kill")
                done = await wait_terminal(client, second["id"])
                assert done["status"] == "completed"
                assert done["worker"].endswith(f":{new_pid}")

                serve.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(serve.wait(), 15) == 0
            finally:
                seen.update(children(serve.pid))
        assert not running_pids(seen), seen
    finally:
        for pid in seen:  # children run in their own sessions: never leave one behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


async def test_closing_after_the_server_went_away_does_not_raise(tmp_path: Path) -> None:
    """A connection that still buffers a write when NATS vanished closes quietly: the API's
    shutdown goes on to dispose of its database (it stopped there, leaking its SQLite connection)."""
    server = NatsServer(tmp_path / "nats", die_with_parent=True)
    await server.start()
    nc = await connect(server.url, name="jobcast-test")
    await server.stop()
    await nc.publish("jobs.nowhere", b"buffered while reconnecting")
    await close_quietly(nc)
    assert nc.is_closed
