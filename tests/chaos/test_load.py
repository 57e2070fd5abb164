"""50 submitters and 20 SSE followers for 20 s: no error answer, no locked database, no lost job."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from streams import NatsServer
from tests.chaos._procs import all_jobs, api_process, wait_all_completed, worker_processes

pytestmark = pytest.mark.chaos

SUBMITTERS = 50
FOLLOWERS = 20
SECONDS = 20


async def test_concurrent_submitters_and_followers(tmp_path: Path, nats_server: NatsServer) -> None:
    answers: Counter[int] = Counter()
    accepted: list[str] = []
    followed: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SECONDS

    async def submitter(client: httpx.AsyncClient) -> None:
        for _ in range(100_000):  # bounded; the deadline ends it
            if loop.time() > deadline:
                return
            response = await client.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 2}})
            answers[response.status_code] += 1
            if response.status_code == 202:
                accepted.append(response.json()["id"])

    async def follower(client: httpx.AsyncClient) -> None:
        for _ in range(10_000):
            if loop.time() > deadline:
                return
            if not accepted:
                await asyncio.sleep(0.05)
                continue
            job_id = random.choice(accepted[-50:])
            kinds = []
            async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events") as source:
                answers[source.response.status_code] += 1
                async for sse in source.aiter_sse():
                    if sse.data:
                        kinds.append(json.loads(sse.data)["kind"])
            assert kinds[0] == "submitted", kinds
            assert kinds[-1] == "completed", kinds
            followed.append(len(kinds))

    async with (
        api_process(nats_server.url, tmp_path, JOBCAST_RATE_LIMIT_PER_MIN="10000000") as api,
        worker_processes(nats_server.url, tmp_path, 2, concurrency=4),
        httpx.AsyncClient(base_url=api.url, timeout=30, limits=httpx.Limits(max_connections=100)) as client,
    ):
        async with asyncio.timeout(SECONDS + 30):
            await asyncio.gather(
                *(submitter(client) for _ in range(SUBMITTERS)), *(follower(client) for _ in range(FOLLOWERS))
            )
        await wait_all_completed(client, len(accepted), timeout=60)
        total, items = await all_jobs(client)
        stderr = api.stderr()

    print(f"accepted {len(accepted)} jobs, followed {len(followed)}, answers {dict(answers)}")
    assert set(answers) == {200, 202}, answers  # zero non-2xx
    assert len(accepted) > SUBMITTERS
    assert len(followed) >= FOLLOWERS
    assert total == len(accepted) == len(set(accepted))
    assert Counter(job["status"] for job in items) == {"completed": total}
    assert {job["id"] for job in items} == set(accepted)
    assert "database is locked" not in stderr.lower()
