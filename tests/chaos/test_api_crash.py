"""kill -9 of the API under live SSE followers: they resume with Last-Event-ID and miss nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from streams import STREAM, NatsServer, connect
from tests.chaos._procs import Event, api_process, sse_history, worker_processes
from tests.conftest import submit, wait_terminal

pytestmark = pytest.mark.chaos

JOBS = 5


class Follower:
    """An SSE client that reconnects with Last-Event-ID until its job's stream ends."""

    def __init__(self, url: str, job_id: str) -> None:
        self.url = url
        self.job_id = job_id
        self.events: list[Event] = []
        self.connections = 0

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(5, read=10)) as http:
            for _ in range(300):  # bounded: each failed try waits 0.1 s
                headers = {"Last-Event-ID": str(self.events[-1][0])} if self.events else {}
                try:
                    async with aconnect_sse(
                        http, "GET", f"/api/v1/jobs/{self.job_id}/events", headers=headers
                    ) as source:
                        assert source.response.status_code == 200
                        self.connections += 1
                        async for sse in source.aiter_sse():
                            if not sse.data:
                                continue  # a keep-alive comment: httpx-sse yields it as an empty event
                            self.events.append((int(sse.id), sse.event, json.loads(sse.data)))
                    return  # the server ended the stream: the job is over
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            raise AssertionError(f"{self.job_id}: gave up reconnecting")


async def stream_last_seq(nats_url: str) -> int:
    nc = await connect(nats_url, name="chaos-test")
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def test_api_kill9_sse_followers_resume(tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        api_process(nats_server.url, tmp_path) as api,
        worker_processes(nats_server.url, tmp_path, 1, concurrency=JOBS),
        httpx.AsyncClient(base_url=api.url, timeout=30) as client,
    ):
        jobs = [await submit(client, params={"steps": 20, "duration_s": 6}) for _ in range(JOBS)]
        followers = [Follower(api.url, job["id"]) for job in jobs]
        tasks = [asyncio.create_task(f.run()) for f in followers]
        try:
            async with asyncio.timeout(15):  # every job running and followed live
                while not all(sum(k == "progress" for _, k, _ in f.events) >= 2 for f in followers):
                    assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
                    await asyncio.sleep(0.05)

            api.kill()
            assert await api.wait() < 0
            seen_before = {f.job_id: f.events[-1][0] for f in followers}
            down_from = await stream_last_seq(nats_server.url)
            await asyncio.sleep(2)  # the workers go on publishing while no API runs
            down_to = await stream_last_seq(nats_server.url)
            assert down_to > down_from, "nothing was published while the API was down"
            await api.start()  # same port, same data dir

            async with asyncio.timeout(30):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for follower in followers:
            done = await wait_terminal(client, follower.job_id, timeout=10)
            assert done["status"] == "completed", done
            full = await sse_history(client, follower.job_id)
            assert follower.connections >= 2, follower.connections
            assert follower.events == full  # every event once, in order, same payloads
            ids = [seq for seq, _, _ in full]
            assert ids == sorted(set(ids))
            kinds = [kind for _, kind, _ in full]
            assert kinds[:2] == ["submitted", "started"], kinds
            assert kinds.count("progress") == 20, kinds
            assert kinds[-1] == "completed", kinds
            assert kinds.count("completed") == 1, kinds
            assert full[-1][0] == done["last_event_id"]
            assert any(seq > seen_before[follower.job_id] for seq in ids)

    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "jobcast.db")) as db:
        for follower in followers:
            rows = db.execute(
                "SELECT seq, kind FROM job_events WHERE job_id = ? ORDER BY seq", (follower.job_id,)
            ).fetchall()
            assert rows == [(seq, kind) for seq, kind, _ in follower.events]
        down = db.execute(
            "SELECT count(*) FROM job_events WHERE seq > ? AND seq <= ?", (down_from, down_to)
        ).fetchone()[0]
        (bookmark,) = db.execute("SELECT last_seq FROM projection_bookmark WHERE name = 'jobs'").fetchone()
    assert down == down_to - down_from  # every event published while the API was down is in SQLite
    assert bookmark >= down_to
