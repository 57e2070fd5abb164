"""Jobs that never succeed end `failed` and exhausted, without holding up the others."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from streams import NatsServer
from tests.chaos._procs import WorkerProcess, api_process, sse_history, wait_all_completed
from tests.conftest import submit, wait_terminal

pytestmark = pytest.mark.chaos

OTHERS = 10


async def test_poison_and_worker_killing_jobs(tmp_path: Path, nats_server: NatsServer) -> None:
    workers: list[WorkerProcess] = []

    async def fresh_worker() -> None:
        worker = WorkerProcess(
            nats_server.url, tmp_path / f"worker{len(workers)}.log", JOBCAST_RETRY_BASE_S="0.2"
        )
        workers.append(worker)
        await worker.start()

    async def kill_on_start(client: httpx.AsyncClient, job_id: str) -> list[str]:
        """Follow the job; each time it starts, SIGKILL the worker that runs it and start another."""
        kinds = []
        async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events") as source:
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # a keep-alive comment: httpx-sse yields it as an empty event
                kinds.append(sse.event)
                if sse.event == "started":
                    workers[-1].kill()
                    assert workers[-1].proc is not None
                    await workers[-1].proc.wait()
                    await fresh_worker()
        return kinds

    try:
        async with (
            api_process(nats_server.url, tmp_path) as api,
            httpx.AsyncClient(base_url=api.url, timeout=30) as client,
        ):
            await fresh_worker()
            killer = await submit(client, params={"steps": 20, "duration_s": 60}, max_attempts=2)
            watch = asyncio.create_task(kill_on_start(client, killer["id"]))
            poison = await submit(client, params={"steps": 0, "fail_times": 100}, max_attempts=3)
            others = [await submit(client, params={"steps": 2, "duration_s": 0.2}) for _ in range(OTHERS)]

            async with asyncio.timeout(45):
                kinds = await watch
            await wait_all_completed(client, OTHERS + 2, timeout=30)

            died: dict[str, Any] = await wait_terminal(client, killer["id"], timeout=5)
            failed: dict[str, Any] = await wait_terminal(client, poison["id"], timeout=5)
            done = [await wait_terminal(client, job["id"], timeout=5) for job in others]
            poison_kinds = [kind for _, kind, _ in await sse_history(client, poison["id"])]
            killer_events = await sse_history(client, killer["id"])
    finally:
        for worker in workers:
            await worker.close()

    assert died["status"] == "failed", died
    assert died["exhausted"] is True
    assert died["attempt"] == 2
    assert "worker running it stopped" in died["error"], died["error"]
    assert kinds.count("started") == 2, kinds
    assert kinds[-1] == "failed", kinds
    assert [kind for _, kind, _ in killer_events] == kinds
    assert json.loads(json.dumps(killer_events[-1][2]))["event"]["exhausted"] is True
    assert len(workers) == 3  # two killed, the third reported the failure

    assert failed["status"] == "failed", failed
    assert failed["exhausted"] is True
    assert failed["attempt"] == 3
    assert "gave up after 3 attempt(s)" in failed["error"], failed["error"]
    # Three deliveries, two of them retried; a delivery cut short by a killed worker counts
    # as an attempt too (its `started` may not even have been published): the limit holds.
    assert poison_kinds.count("started") in (2, 3), poison_kinds
    assert poison_kinds.count("retrying") in (1, 2), poison_kinds
    assert poison_kinds[-1] == "failed", poison_kinds

    assert [job["status"] for job in done] == ["completed"] * OTHERS
