"""Job semantics against the real server: batches, cancel, retry (explicit and automatic),
delete, idempotency, queue position, priority, scheduling, and stale jobs of dead workers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from app import Settings
from streams import NatsServer
from tests.conftest import (
    ApiServer,
    WorkerRunner,
    replace,
    spawned,
    submit,
    wait_terminal,
    worker_process,
)
from tests.test_compileo import SNIPPETS, faster
from tests.test_recovery import wait_ready
from workers import WorkerSettings

NOOP_DEFAULTS = {
    "duration_s": 0.0,
    "steps": 10,
    "fail": False,
    "error": "noop failed on request",
    "fail_times": 0,
    "result_bytes": 0,
    "hang_s": 0.0,
    "block_s": 0.0,
    "check_every_s": 0.05,
}


async def get(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def wait_until(
    client: httpx.AsyncClient, job_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """GET the job until `check` holds."""
    async with asyncio.timeout(timeout):
        while not check(job := await get(client, job_id)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return job


async def history(client: httpx.AsyncClient, job_id: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The envelopes of the job's SSE stream, until the server ends it (after the job's end)."""
    events = []
    async with (
        asyncio.timeout(timeout),
        aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events") as source,
    ):
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            envelope = json.loads(sse.data)
            assert envelope["kind"] == sse.event
            events.append(envelope)
    return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["kind"] for event in events]


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def post_batch(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("type", "noop")
    return await client.post("/api/v1/jobs/batch", json=body)


async def listed(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/api/v1/jobs", params=params)
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["total"] == len(page["items"])
    return [job["id"] for job in page["items"]]


@pytest.fixture
async def two_workers(worker_settings: WorkerSettings) -> Any:
    runners = [WorkerRunner(replace(worker_settings, name=name)) for name in ("w1", "w2")]
    for runner in runners:
        await runner.start()
    yield runners
    for runner in runners:
        await runner.stop()


# batches ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_batch_children_run_in_parallel_and_parent_follows(
    client: httpx.AsyncClient, two_workers: list[WorkerRunner]
) -> None:
    response = await post_batch(
        client, items=[{"params": {"steps": 2}}, {"params": {"steps": 4}, "title": "second"}],
        params={"duration_s": 1.0, "steps": 3}, title="b",
    )  # fmt: skip
    assert response.status_code == 202, response.text
    parent = response.json()
    assert (parent["type"], parent["pool"]) == ("batch_noop", "batch")
    assert parent["status"] in {"pending", "running"}
    assert parent["params"] == {"type": "noop", "params": {"duration_s": 1.0, "steps": 3}, "count": 2}
    assert parent["queue_position"] is None
    sse = asyncio.create_task(history(client, parent["id"]))

    response = await client.get(f"/api/v1/jobs/{parent['id']}/children")
    assert response.status_code == 200, response.text
    children = response.json()
    assert [c["params"] for c in children] == [
        NOOP_DEFAULTS | {"duration_s": 1.0, "steps": 2},
        NOOP_DEFAULTS | {"duration_s": 1.0, "steps": 4},
    ]
    assert [c["title"] for c in children] == ["b #1", "second"]
    assert {(c["parent_id"], c["type"], c["pool"]) for c in children} == {(parent["id"], "noop", "cpu")}
    ids = [c["id"] for c in children]

    running = await wait_until(client, parent["id"], lambda j: 0 < j["progress"] < 100)
    assert running["status"] == "running"
    assert running["result"]["total"] == 2
    done = await wait_terminal(client, parent["id"], timeout=10)
    assert done["status"] == "completed"
    assert done["progress"] == 100.0
    assert done["result"] == {"total": 2, "counts": {"completed": 2}, "completed": ids, "failed": [],
                              "cancelled": []}  # fmt: skip
    events = await asyncio.wait_for(sse, 5)  # the parent's stream ends by itself
    assert events[-1]["kind"] == "completed"
    assert events[-1]["status"] == "completed"
    assert "progress" in kinds(events)

    children = [await get(client, job_id) for job_id in ids]
    assert [c["status"] for c in children] == ["completed", "completed"]
    assert {c["worker"] for c in children} == {"w1", "w2"}
    first, second = ((at(c["started_at"]), at(c["completed_at"])) for c in children)
    assert first[0] < second[1], "children did not overlap"
    assert second[0] < first[1], "children did not overlap"

    assert await listed(client) == [parent["id"]]
    assert set(await listed(client, include_children="true")) == {parent["id"], *ids}
    assert await listed(client, parent_id=parent["id"]) == ids[::-1]  # newest first


@pytest.mark.slow
async def test_batch_with_a_failed_child_fails(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    items = [{"params": {}}, {"params": {"fail": True, "error": "bad"}}, {"params": {}}]
    response = await post_batch(client, items=items, params={"steps": 2, "duration_s": 0.3})
    assert response.status_code == 202, response.text
    parent = response.json()
    done = await wait_terminal(client, parent["id"], timeout=10)
    ids = [c["id"] for c in (await client.get(f"/api/v1/jobs/{parent['id']}/children")).json()]
    assert done["status"] == "failed"
    assert done["result"] == {"total": 3, "counts": {"completed": 2, "failed": 1}, "completed": [ids[0], ids[2]],
                              "failed": [ids[1]], "cancelled": []}  # fmt: skip
    assert done["error"] == "1 of 3 children did not complete"
    children = [await get(client, job_id) for job_id in ids]
    assert children[1]["error"] == "bad"
    # one worker with one slot runs them one after the other
    spans = sorted((at(c["started_at"]), at(c["completed_at"])) for c in children)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    assert kinds(await history(client, parent["id"]))[-1] == "failed"


async def test_batch_invalid_bodies_are_422(client: httpx.AsyncClient) -> None:
    both = await post_batch(client, items=[{"params": {}}], file_ids=["f1"])
    neither = await post_batch(client)
    for response in (both, neither):
        assert response.status_code == 422, response.text
        assert "exactly one of `file_ids` or `items`" in response.json()["detail"]
    bad = await post_batch(client, items=[{"params": {}}, {"params": {"steps": -1}}])
    assert bad.status_code == 422, bad.text
    assert "$.items[1].params.steps" in bad.json()["detail"]
    empty = await post_batch(client, items=[])
    assert empty.status_code == 422, empty.text
    assert await listed(client, include_children="true") == []


# cancel ---------------------------------------------------------------------------------------


async def test_cancel_pending_job_never_runs(
    client: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    first = await submit(client, params={"steps": 1})
    second = await submit(client, params={"steps": 1})
    response = await client.post(f"/api/v1/jobs/{first['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    response = await client.post(f"/api/v1/jobs/cancel/{second['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"message": f"Job {second['id']} cancelled successfully"}
    assert (await get(client, second["id"]))["status"] == "cancelled"

    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        marker = await submit(client, params={"steps": 1})  # queued behind both
        assert (await wait_terminal(client, marker["id"], timeout=10))["status"] == "completed"
        for job in (first, second):
            await wait_until(client, job["id"], lambda j: j["held_by"] is None)
    finally:
        await runner.stop()
    for job in (first, second):
        after = await get(client, job["id"])
        assert after["status"] == "cancelled"
        assert after["started_at"] is None
        assert after["result"] is None
        events = await history(client, job["id"])
        assert "started" not in kinds(events), kinds(events)
        assert kinds(events)[-1] == "cancelled"


@pytest.mark.slow
async def test_cancel_running_job_and_terminal_conflict(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 20, "duration_s": 20})
    await wait_until(client, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0)
    start = asyncio.get_running_loop().time()
    response = await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == job["id"]
    done = await wait_terminal(client, job["id"], timeout=5)
    assert asyncio.get_running_loop().time() - start < 2
    assert done["status"] == "cancelled"
    assert done["progress"] < 100
    assert done["error"] == "cancelled by request"
    assert kinds(await history(client, job["id"]))[-1] == "cancelled"

    for path in (f"/api/v1/jobs/{job['id']}/cancel", f"/api/v1/jobs/cancel/{job['id']}"):
        response = await client.post(path)
        assert response.status_code == 409, response.text
        assert response.json()["detail"] == (
            f"job {job['id']} is already cancelled; only active jobs can be cancelled"
        )
    quick = await submit(client, params={"steps": 1})
    assert (await wait_terminal(client, quick["id"]))["status"] == "completed"
    response = await client.post(f"/api/v1/jobs/{quick['id']}/cancel")
    assert response.status_code == 409
    assert "already completed" in response.json()["detail"]
    assert (await client.post("/api/v1/jobs/nope/cancel")).status_code == 404


async def test_cancel_batch_parent_cancels_children(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    response = await post_batch(client, items=[{}, {}, {}], params={"steps": 20, "duration_s": 20})
    parent = response.json()
    ids = [c["id"] for c in (await client.get(f"/api/v1/jobs/{parent['id']}/children")).json()]
    await wait_until(client, parent["id"], lambda j: j["status"] == "running")
    response = await client.post(f"/api/v1/jobs/{parent['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    children = [await wait_terminal(client, job_id, timeout=3) for job_id in ids]
    assert [c["status"] for c in children] == ["cancelled"] * 3
    assert sum(c["started_at"] is not None for c in children) == 1  # one was running
    assert (await get(client, parent["id"]))["status"] == "cancelled"
    assert kinds(await history(client, parent["id"]))[-1] == "cancelled"


async def test_cancel_pending_batch(client: httpx.AsyncClient) -> None:
    parent = (await post_batch(client, items=[{}, {}], params={"steps": 1})).json()
    response = await client.post(f"/api/v1/jobs/cancel/{parent['id']}")
    assert response.status_code == 200, response.text
    assert (await get(client, parent["id"]))["status"] == "cancelled"
    children = (await client.get(f"/api/v1/jobs/{parent['id']}/children")).json()
    assert [c["status"] for c in children] == ["cancelled", "cancelled"]


# retry ------------------------------------------------------------------------------------------


async def test_retry_failed_job_runs_again(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    params = {"steps": 2, "fail": True, "error": "boom"}
    job = await submit(client, params=params)
    failed = await wait_terminal(client, job["id"])
    assert (failed["status"], failed["attempt"]) == ("failed", 1)
    response = await client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == job["id"]
    assert body["status"] in {"pending", "running"}
    assert body["attempt"] == 2
    again = await wait_terminal(client, job["id"])
    assert (again["status"], again["attempt"], again["error"]) == ("failed", 2, "boom")
    assert again["params"] == job["params"] == NOOP_DEFAULTS | params

    response = await client.post(f"/api/v1/jobs/restart/{job['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"message": f"Job {job['id']} restarted successfully"}
    third = await wait_terminal(client, job["id"])
    assert (third["status"], third["attempt"]) == ("failed", 3)
    events = await history(client, job["id"])
    started = [e for e in events if e["kind"] == "started"]
    assert [e["attempt"] for e in started] == [1, 2, 3]
    assert [e["attempt"] for e in events if e["kind"] == "failed"] == [1, 2, 3]
    assert kinds(events).count("submitted") == 3


async def test_retry_cancelled_job_and_conflicts(
    client: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    job = await submit(client, params={"steps": 1})
    pending = await submit(client, params={"steps": 1})
    for path in (f"/api/v1/jobs/{pending['id']}/retry", f"/api/v1/jobs/restart/{pending['id']}"):
        response = await client.post(path)
        assert response.status_code == 409, response.text
        assert response.json()["detail"] == (
            f"job {pending['id']} is pending; only failed or cancelled jobs can be retried"
        )
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    response = await client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["attempt"]) == ("pending", 2)

    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        done = await wait_terminal(client, job["id"])
        assert (await wait_terminal(client, pending["id"]))["status"] == "completed"
    finally:
        await runner.stop()
    assert (done["status"], done["attempt"]) == ("completed", 2)
    assert done["result"] == {"steps": 1, "duration_s": 0.0, "delivery": 1}
    assert [
        (e["kind"], e["attempt"]) for e in await history(client, job["id"]) if e["kind"] == "started"
    ] == [("started", 2)]
    for path in (f"/api/v1/jobs/{job['id']}/retry", f"/api/v1/jobs/restart/{job['id']}"):
        response = await client.post(path)
        assert response.status_code == 409, response.text
        assert "is completed" in response.json()["detail"]


async def test_compileo_recovery_snippet_restarts_failed_job(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, Any] = {"__name__": "compileo_snippets"}
    exec(SNIPPETS.replace("http://localhost:8000", api.url), namespace)
    calls = faster(namespace)
    job = await submit(client, params={"steps": 1, "fail": True, "error": "boom"})
    await wait_terminal(client, job["id"])
    final = await asyncio.wait_for(asyncio.to_thread(namespace["monitor_job_with_recovery"], job["id"]), 10)
    assert calls == [job["id"]]
    assert final["status"] == "failed"  # it fails again: the same params
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"Job {job['id']} failed: boom", "Job restarted successfully"]
    assert (await get(client, job["id"]))["attempt"] == 2


# automatic retries ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_automatic_retries(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    flaky = await submit(client, params={"steps": 1, "fail_times": 2, "error": "flaky"}, max_attempts=3)
    hopeless = await submit(client, params={"steps": 1, "fail_times": 5}, max_attempts=2)
    broken = await submit(client, params={"steps": 1, "fail": True, "error": "broken"}, max_attempts=3)

    done = await wait_terminal(client, flaky["id"])
    assert (done["status"], done["attempt"], done["exhausted"], done["error"]) == (
        "completed",
        3,
        False,
        None,
    )
    assert done["result"] == {"steps": 1, "duration_s": 0.0, "delivery": 3}
    events = await history(client, flaky["id"])
    retrying = [e for e in events if e["kind"] == "retrying"]
    assert [e["attempt"] for e in retrying] == [1, 2]
    assert all("flaky" in e["event"]["error"] for e in retrying)
    delays = [e["event"]["delay_s"] for e in retrying]
    assert 0 < delays[0] < delays[1], delays
    assert [e["attempt"] for e in events if e["kind"] == "started"] == [1, 2, 3]

    failed = await wait_terminal(client, hopeless["id"])
    assert (failed["status"], failed["attempt"], failed["exhausted"]) == ("failed", 2, True)
    assert "gave up after 2" in failed["error"]
    assert kinds(await history(client, hopeless["id"])).count("retrying") == 1

    failed = await wait_terminal(client, broken["id"])
    assert (failed["status"], failed["attempt"], failed["exhausted"]) == ("failed", 1, False)
    assert failed["error"] == "broken"
    assert "retrying" not in kinds(await history(client, broken["id"]))


# delete -----------------------------------------------------------------------------------------


async def test_delete_jobs_and_batches_survives_rebuild(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner, settings: Settings
) -> None:
    kept = await submit(client, params={"steps": 1})
    gone = await submit(client, params={"steps": 1})
    batch = (await post_batch(client, items=[{}, {}], params={"steps": 1})).json()
    for job_id in (kept["id"], gone["id"], batch["id"]):
        await wait_terminal(client, job_id)
    children = [c["id"] for c in (await client.get(f"/api/v1/jobs/{batch['id']}/children")).json()]
    await wait_until(client, children[-1], lambda j: j["held_by"] is None)

    busy = await submit(client, params={"steps": 20, "duration_s": 20})
    response = await client.delete(f"/api/v1/jobs/{busy['id']}")
    assert response.status_code == 409, response.text
    assert "cancel it before deleting it" in response.json()["detail"]

    for job_id in (gone["id"], batch["id"]):
        response = await client.delete(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 204, response.text
        assert response.content == b""
    deleted = [gone["id"], batch["id"], *children]

    async def check() -> None:
        for job_id in deleted:
            assert (await client.get(f"/api/v1/jobs/{job_id}")).status_code == 404
        assert (await client.delete(f"/api/v1/jobs/{gone['id']}")).status_code == 404
        assert set(await listed(client, include_children="true")) == {kept["id"], busy["id"]}

    await check()
    await client.post(f"/api/v1/jobs/{busy['id']}/cancel")
    await api.stop()
    for suffix in ("", "-wal", "-shm"):
        (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)
    await api.start()
    await wait_ready(api.url)  # the projection has replayed the stream
    assert (await wait_terminal(client, busy["id"]))["status"] == "cancelled"
    assert (await get(client, kept["id"]))["status"] == "completed"
    await check()


# idempotency ------------------------------------------------------------------------------------


async def test_idempotent_submissions(client: httpx.AsyncClient) -> None:
    first = await client.post("/api/v1/jobs", json={"type": "noop", "client_request_id": "k1"})
    again = await client.post("/api/v1/jobs", json={"type": "noop", "client_request_id": "k1"})
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["client_request_id"] == "k1"

    header = {"Idempotency-Key": "k2"}
    first_h = await client.post("/api/v1/jobs", json={"type": "noop"}, headers=header)
    again_h = await client.post("/api/v1/jobs", json={"type": "noop"}, headers=header)
    assert (first_h.status_code, again_h.status_code) == (202, 200), again_h.text
    assert again_h.json()["id"] == first_h.json()["id"] != first.json()["id"]

    batch = [await post_batch(client, items=[{}], client_request_id="k3") for _ in range(2)]
    assert [r.status_code for r in batch] == [202, 200]
    assert batch[0].json()["id"] == batch[1].json()["id"]

    responses = await asyncio.gather(
        *(client.post("/api/v1/jobs", json={"type": "noop", "client_request_id": "k4"}) for _ in range(10))
    )
    assert sorted(r.status_code for r in responses) == [200] * 9 + [202], [r.text for r in responses]
    (concurrent,) = {r.json()["id"] for r in responses}

    other = await submit(client, client_request_id="k5")
    ids = {first.json()["id"], first_h.json()["id"], batch[0].json()["id"], concurrent, other["id"]}
    assert len(ids) == 5
    assert set(await listed(client)) == ids
    await client.post(f"/api/v1/jobs/{concurrent}/cancel")  # so that its event stream ends
    assert kinds(await history(client, concurrent)).count("submitted") == 1


# queue position and priority ------------------------------------------------------------------


async def test_concurrent_submits_answer_with_the_queue_position_a_get_gives(
    client: httpx.AsyncClient,
) -> None:
    # Submits the projection applies in one batch get their 202's positions from one statement;
    # each is the job's place as the batch left the queue, as GET counts it once it stands still.
    accepted = await asyncio.gather(*(submit(client, params={"steps": 0}) for _ in range(12)))
    aheads = sorted(job["queue_position"]["ahead"] for job in accepted)
    assert aheads == list(range(12))
    for job in accepted:
        position = job["queue_position"]
        assert position["ahead"] < position["total_active"] <= 12
        now = (await get(client, job["id"]))["queue_position"]
        assert now == {"ahead": position["ahead"], "total_active": 12}


@pytest.mark.slow
async def test_queue_position(client: httpx.AsyncClient, worker_settings: WorkerSettings) -> None:
    jobs = [await submit(client, params={"steps": 0}) for _ in range(5)]
    for ahead, job in enumerate(jobs):
        assert job["queue_position"] == {"ahead": ahead, "total_active": ahead + 1}
        assert (await get(client, job["id"]))["queue_position"] == {"ahead": ahead, "total_active": 5}
    urgent = await submit(client, params={"steps": 4, "duration_s": 1}, priority=5)
    assert urgent["queue_position"] == {"ahead": 0, "total_active": 6}
    assert [(await get(client, j["id"]))["queue_position"]["ahead"] for j in jobs] == [1, 2, 3, 4, 5]

    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        running = await wait_until(client, urgent["id"], lambda j: j["status"] == "running")
        assert running["queue_position"] == {"ahead": 0, "total_active": 6}
        positions = [(await get(client, j["id"]))["queue_position"] for j in jobs]
        assert positions == [{"ahead": i + 1, "total_active": 6} for i in range(5)]  # behind the running one
        assert (await wait_terminal(client, urgent["id"]))["queue_position"] == FINISHED
        assert (await wait_terminal(client, jobs[-1]["id"]))["queue_position"] == FINISHED
    finally:
        await runner.stop()


FINISHED = {"ahead": 0, "total_active": 0}
"""A finished job's queue position, as seed 001 gives it."""


async def positions(client: httpx.AsyncClient, jobs: list[dict[str, Any]]) -> list[dict[str, int] | None]:
    """The jobs' queue positions as GET gives them, checked against the list and its page of them."""
    each = [(await get(client, job["id"]))["queue_position"] for job in jobs]
    listed = (await client.get("/api/v1/jobs", params={"limit": 100})).json()["items"]
    by_id = {job["id"]: job["queue_position"] for job in listed}
    assert [by_id[job["id"]] for job in jobs] == each  # the list counts them the same way
    return each


async def test_queue_position_counts_running_jobs_ahead_as_seed_001(
    client: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    """Seed 001: `ahead` is the pool's running jobs plus the pending ones taken first; a running job
    is at the head of its queue, a finished one has no place in it."""
    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        first = await submit(client, params={"duration_s": 60, "steps": 60})
        await wait_until(client, first["id"], lambda j: j["status"] == "running")
        older = await submit(client, params={"steps": 0})
        newer = await submit(client, params={"steps": 0})
        assert older["queue_position"] == {"ahead": 1, "total_active": 2}  # as submit answers it
        assert newer["queue_position"] == {"ahead": 2, "total_active": 3}
        assert await positions(client, [first, older, newer]) == [
            {"ahead": 0, "total_active": 3},
            {"ahead": 1, "total_active": 3},
            {"ahead": 2, "total_active": 3},
        ]
        page = (await client.get(f"/ui/jobs/{newer['id']}")).text
        assert "Queued: 2 ahead of it (running, or to be taken first) among 3 active jobs" in page
        await client.post(f"/api/v1/jobs/{first['id']}/cancel")
        assert (await wait_terminal(client, first["id"]))["queue_position"] == FINISHED
        assert (await wait_terminal(client, newer["id"]))["queue_position"] == FINISHED
        assert await positions(client, [first, older, newer]) == [FINISHED] * 3
    finally:
        await runner.stop()


async def test_a_retrying_job_waits_in_the_queue_and_a_scheduled_one_is_not_in_it(
    client: httpx.AsyncClient, worker_settings: WorkerSettings
) -> None:
    """A retrying job is back in the queue, where its submission was (it is redelivered when its
    backoff ends); a scheduled job joins the queue only when it is due."""
    runner = WorkerRunner(replace(worker_settings, retry_base_s=60, retry_max_s=60))
    await runner.start()
    try:
        flaky = await submit(client, params={"steps": 0, "fail_times": 1})
        await wait_until(client, flaky["id"], lambda j: j["status"] == "retrying")
        blocker = await submit(client, params={"duration_s": 60, "steps": 60})
        await wait_until(client, blocker["id"], lambda j: j["status"] == "running")
        later = await submit(client, params={"steps": 0})
        waiting = await submit(client, params={"steps": 0}, scheduled_for="2100-01-01T00:00:00Z")
        assert await positions(client, [flaky, blocker, later, waiting]) == [
            {"ahead": 1, "total_active": 3},
            {"ahead": 0, "total_active": 3},
            {"ahead": 2, "total_active": 3},
            None,
        ]
        for job in (flaky, blocker, later, waiting):
            await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    finally:
        await runner.stop()


async def test_higher_priority_runs_first(client: httpx.AsyncClient, worker_settings: WorkerSettings) -> None:
    low = [await submit(client, params={"steps": 0}, priority=-(i % 2)) for i in range(30)]
    urgent = await submit(client, params={"steps": 0}, priority=5)
    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        done = [await wait_terminal(client, job["id"]) for job in [urgent, *low]]
    finally:
        await runner.stop()
    assert {job["status"] for job in done} == {"completed"}
    order = [job["id"] for job in sorted(done, key=lambda j: at(j["started_at"]))]
    expected = [urgent["id"]] + [j["id"] for j in low if j["priority"] == 0] + [j["id"] for j in low
                                                                                if j["priority"] == -1]  # fmt: skip
    assert order == expected


# scheduling ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_scheduled_jobs(
    api: ApiServer, client: httpx.AsyncClient, worker_settings: WorkerSettings, settings: Settings
) -> None:
    now = datetime.now(UTC)
    soon = now + timedelta(seconds=2.5)
    # also given in another time zone: the server keeps it in UTC
    later = (now + timedelta(seconds=3)).astimezone(timezone(timedelta(hours=2)))
    dropped = await submit(client, params={"steps": 1}, scheduled_for=soon.isoformat())
    job = await submit(client, params={"steps": 1}, scheduled_for=later.isoformat())
    assert (job["status"], at(job["scheduled_for"])) == ("scheduled", later)
    assert job["queue_position"] is None
    response = await client.post(f"/api/v1/jobs/{dropped['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"

    runner = WorkerRunner(worker_settings)
    await runner.start()
    await runner.stop()  # a worker restart while the job waits
    await api.stop()
    await api.start()
    assert (await get(client, job["id"]))["status"] == "scheduled"
    runner = WorkerRunner(worker_settings)
    await runner.start()
    try:
        done = await wait_terminal(client, job["id"], timeout=10)
        await wait_until(client, dropped["id"], lambda j: j["held_by"] is None)
    finally:
        await runner.stop()
    assert done["status"] == "completed"
    assert later <= at(done["started_at"]) <= later + timedelta(seconds=1)
    events = kinds(await history(client, job["id"]))
    assert events[0] == "submitted"  # a second `submitted` is the stream releasing it
    assert (events.count("started"), events[-1]) == (1, "completed")
    cancelled = await get(client, dropped["id"])
    assert (cancelled["status"], cancelled["started_at"]) == ("cancelled", None)
    assert "started" not in kinds(await history(client, dropped["id"]))


# a worker that dies -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_job_of_killed_worker_fails_when_attempts_are_used_up(
    client: httpx.AsyncClient, nats_server: NatsServer, worker_settings: WorkerSettings
) -> None:
    job = await submit(client, params={"steps": 20, "duration_s": 20}, max_attempts=1)
    async with spawned(*worker_process(nats_server.url)) as proc:  # type: ignore[arg-type]
        running = await wait_until(client, job["id"], lambda j: j["status"] == "running")
        os.killpg(proc.pid, signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    second = WorkerRunner(worker_settings)
    await second.start()
    try:
        done = await wait_terminal(client, job["id"], timeout=10)
    finally:
        await second.stop()
    assert (done["status"], done["attempt"], done["exhausted"]) == ("failed", 1, True)
    assert "gave up after 1 attempt(s): the worker running it stopped" in done["error"]
    assert done["held_by"] is None
    assert running["worker"] != "test-worker"
    events = await history(client, job["id"])
    assert [e["attempt"] for e in events if e["kind"] == "started"] == [1]
    assert kinds(events)[-1] == "failed"
