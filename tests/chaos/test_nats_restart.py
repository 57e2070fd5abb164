"""nats-server restarted (same port, same store) with 500 jobs in flight: none lost, none twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from streams import NatsServer
from tests.chaos._procs import all_jobs, api_process, wait_all_completed, worker_processes

pytestmark = pytest.mark.chaos

JOBS = 500
CLIENTS = 5


async def workers_seen(client: httpx.AsyncClient) -> set[str]:
    response = await client.get("/api/v1/jobs", params={"status": "completed", "limit": 500})
    return {job["worker"] for job in response.json()["items"]}


async def test_nats_restart_with_500_jobs_in_flight(tmp_path: Path, nats_server: NatsServer) -> None:
    answers: Counter[int] = Counter()
    accepted: dict[str, str] = {}  # client_request_id -> job id
    unavailable: list[str] = []
    times: list[float] = []
    loop = asyncio.get_running_loop()
    outage = asyncio.Event()

    async def submitter(client: httpx.AsyncClient, index: int) -> None:
        for n in range(JOBS // CLIENTS):
            if n == JOBS // CLIENTS // 2:
                await outage.wait()  # the second half meets the broker's restart, however fast the first went
            key = f"c{index}-{n}"
            body = {"type": "noop", "params": {"steps": 1, "duration_s": 0}, "client_request_id": key}
            for _ in range(200):  # bounded: a 503 is retried with the same key until it is accepted
                try:
                    response = await client.post("/api/v1/jobs", json=body)
                except httpx.TransportError:
                    answers[0] += 1
                    await asyncio.sleep(0.1)
                    continue
                answers[response.status_code] += 1
                if response.status_code in (200, 202):
                    times.append(loop.time())
                    assert response.json()["client_request_id"] == key
                    accepted[key] = response.json()["id"]
                    break
                assert response.status_code == 503, response.text
                unavailable.append(response.json()["detail"])
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{key} never accepted")

    async with (
        api_process(nats_server.url, tmp_path, JOBCAST_SUBMIT_TIMEOUT_S="3") as api,
        worker_processes(nats_server.url, tmp_path, 2, concurrency=4) as workers,
        httpx.AsyncClient(base_url=api.url, timeout=30) as client,
    ):
        tasks = [asyncio.create_task(submitter(client, i)) for i in range(CLIENTS)]
        try:
            async with asyncio.timeout(10):
                while len(accepted) < JOBS // 5:  # a fifth accepted
                    assert not any(t.done() and t.exception() for t in tasks)
                    await asyncio.sleep(0.01)
                # Both workers past start-up (a worker still creating its consumers when the
                # broker goes away exits instead of waiting: see docs/reliability.md).
                while len(await workers_seen(client)) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            in_flight_at_stop = len(accepted)
            await nats_server.stop()
            outage.set()
            await asyncio.sleep(1.5)  # submissions meet the outage
            await nats_server.start()  # same port, same store
            restarted = loop.time()
            async with asyncio.timeout(60):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        assert len(accepted) == JOBS
        assert len(set(accepted.values())) == JOBS
        await wait_all_completed(client, JOBS, timeout=60)
        total, items = await all_jobs(client)
        assert all(w.alive for w in workers)  # nothing was restarted but nats-server
        assert api.proc is not None
        assert api.proc.returncode is None

    assert in_flight_at_stop < JOBS
    assert total == JOBS
    assert Counter(job["id"] for job in items) == Counter(accepted.values())  # none missing, none twice
    assert Counter(job["status"] for job in items) == {"completed": JOBS}
    assert all(job["result"]["steps"] == 1 for job in items)
    assert answers[202] >= 1
    assert set(answers) <= {0, 200, 202, 503}, answers
    stall = min(t for t in times if t > restarted) - restarted
    print(f"first acceptance {stall:.1f} s after the restart")
    print(f"answers: {dict(answers)}; 503s: {Counter(d.split(' (')[0] for d in unavailable)}")
