"""Submit -> completed, the shortest path through every process."""

from __future__ import annotations

import httpx

from tests.conftest import WorkerRunner, submit, wait_terminal


async def test_noop_job_completes(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 3}, title="smoke")
    assert job["status"] in {"pending", "running", "completed"}
    assert job["title"] == "smoke"
    assert job["params"]["steps"] == 3

    fetched = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert fetched["id"] == job["id"]

    done = await wait_terminal(client, job["id"])
    assert done["status"] == "completed"
    assert done["progress"] == 100.0
    assert done["result"] == {"steps": 3, "duration_s": 0.0, "delivery": 1}
    assert done["started_at"] is not None
    assert done["completed_at"] is not None
