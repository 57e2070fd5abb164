"""Seed 003's admin jobs API, by a client written from the seed's text alone (its routes, its
`JobCreate` and `JobResponse` names, its query parameters), against a real server and worker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

from tests.conftest import TERMINAL, WorkerRunner
from tests.test_security import Tenants, tenants, ws_frames, ws_json

__all__ = ["tenants"]  # the fixture, imported to be used here

# --- the client, from the seed's text ---------------------------------------------------------


class JobCreate(msgspec.Struct, kw_only=True):
    """The seed's create body; sent whole, nulls included, as a pydantic client sends it."""

    job_type: str
    title: str
    description: str | None = None
    parameters: dict[str, Any] | None = {}
    priority: int = 0
    scheduled_for: datetime | None = None


class JobResponse(msgspec.Struct, kw_only=True):
    """The seed's job answer; decoding checks every field is there with its type."""

    id: str
    job_type: str
    title: str
    status: str
    progress_percentage: int
    progress_message: str | None
    result: dict[str, Any] | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class SeedClient:
    """One caller of the seed's `jobs_router` (prefix /jobs, under /api/v1)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"/api/v1/jobs{path}", **kwargs)
        assert response.is_success, (method, path, response.status_code, response.text)
        return response.json()

    async def create_job(self, job: JobCreate) -> JobResponse:
        body = msgspec.json.encode(job)
        response = await self.http.post(
            "/api/v1/jobs/", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.is_success, response.text
        return msgspec.json.decode(response.content, type=JobResponse)

    async def get_user_jobs(self, page: int = 1, per_page: int = 20, status: str | None = None) -> Any:
        params: dict[str, Any] = {"page": page, "per_page": per_page}
        if status is not None:
            params["status"] = status
        return await self._json("GET", "/", params=params)

    async def get_job(self, job_id: str) -> JobResponse:
        response = await self.http.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return msgspec.json.decode(response.content, type=JobResponse)

    async def cancel_job(self, job_id: str) -> Any:
        return await self._json("POST", f"/{job_id}/cancel")

    async def retry_job(self, job_id: str) -> Any:
        return await self._json("POST", f"/{job_id}/retry")

    async def get_all_jobs(
        self, page: int = 1, per_page: int = 50, status: str | None = None, job_type: str | None = None
    ) -> Any:
        params: dict[str, Any] = {"page": page, "per_page": per_page}
        params |= {k: v for k, v in (("status", status), ("job_type", job_type)) if v is not None}
        return await self._json("GET", "/admin/all", params=params)

    async def get_job_statistics(self) -> Any:
        return await self._json("GET", "/admin/statistics")

    async def force_complete_job(self, job_id: str, result: dict[str, Any] | None = None) -> Any:
        """`result: Optional[dict] = Body(None)`: the body is the result itself."""
        return await self._json("POST", f"/admin/{job_id}/force-complete", json=result)

    async def cleanup_old_jobs(self, days_old: int = 30) -> Any:
        return await self._json("DELETE", "/admin/cleanup", params={"days_old": days_old})

    async def get_queue_status(self) -> Any:
        return await self._json("GET", "/admin/queue-status")

    async def until_ended(self, job_id: str, timeout: float = 30) -> JobResponse:
        """Poll get_job (the seed has no long-poll) until the job has ended."""
        async with asyncio.timeout(timeout):
            while (job := await self.get_job(job_id)).status not in TERMINAL:  # noqa: ASYNC110 - over HTTP
                await asyncio.sleep(0.05)
        return job


# --- fixtures ---------------------------------------------------------------------------------


class Callers:
    """Seed clients for alice and bob (users) and root (admin) of one API."""

    def __init__(self, tenants: Tenants) -> None:
        self.alice, self.bob, self.root = (
            SeedClient(http) for http in (tenants.alice, tenants.bob, tenants.root)
        )


@pytest.fixture
def callers(tenants: Tenants) -> Callers:
    """The keys and API of test_security's `tenants`, called the seed's way."""
    return Callers(tenants)


def later() -> datetime:
    """A time far enough ahead that a job scheduled for it waits through the test."""
    return datetime.now(UTC) + timedelta(hours=1)


# --- the tests --------------------------------------------------------------------------------


async def test_create_follow_cancel_and_retry_with_the_seeds_names(
    callers: Callers, worker: WorkerRunner
) -> None:
    alice = callers.alice
    job = await alice.create_job(
        JobCreate(job_type="noop", title="seed job", parameters={"steps": 4, "duration_s": 0.2}, priority=3)
    )
    assert (job.job_type, job.title, job.result, job.error_message) == ("noop", "seed job", None, None)
    assert job.status == "pending"
    assert job.progress_percentage == 0
    done = await alice.until_ended(job.id)
    assert (done.status, done.progress_percentage, done.error_message) == ("completed", 100, None)
    assert done.result is not None
    assert done.started_at is not None
    assert done.completed_at is not None
    assert done.completed_at >= done.started_at >= done.created_at

    bad = await alice.create_job(
        JobCreate(job_type="noop", title="bad", parameters={"steps": 1, "fail": True, "error": "bad input"})
    )
    failed = await alice.until_ended(bad.id)
    assert (failed.status, failed.error_message) == ("failed", "bad input")
    retried = await alice.retry_job(bad.id)
    assert retried["id"] == bad.id
    assert retried["attempt"] == 2
    assert retried["status"] in {"pending", "running", "failed"}
    assert (await alice.until_ended(bad.id)).error_message == "bad input"  # it fails again, as asked

    waiting = await alice.create_job(JobCreate(job_type="noop", title="later", scheduled_for=later()))
    assert waiting.status == "scheduled"
    cancelled = await alice.cancel_job(waiting.id)
    assert (cancelled["id"], cancelled["status"]) == (waiting.id, "cancelled")
    assert (await alice.get_job(waiting.id)).status == "cancelled"


async def test_the_seeds_paging_and_status_filter(callers: Callers) -> None:
    alice = callers.alice
    made = [
        (await alice.create_job(JobCreate(job_type="noop", title=f"j{i}", scheduled_for=later()))).id
        for i in range(5)
    ]
    await alice.cancel_job(made[0])
    newest_first = made[::-1]
    pages = [await alice.get_user_jobs(page=n, per_page=2) for n in (1, 2, 3, 4)]
    assert [[j["id"] for j in p["items"]] for p in pages] == [
        newest_first[0:2], newest_first[2:4], newest_first[4:], [],
    ]  # fmt: skip
    assert [(p["page"], p["per_page"], p["total"]) for p in pages] == [(n, 2, 5) for n in (1, 2, 3, 4)]
    assert [(p["limit"], p["offset"]) for p in pages] == [(2, 0), (2, 2), (2, 4), (2, 6)]
    first = await alice.get_user_jobs()
    assert (first["page"], first["per_page"], first["total"], len(first["items"])) == (1, 20, 5, 5)
    only = await alice.get_user_jobs(status="cancelled")
    assert [(j["id"], j["job_type"], j["status"]) for j in only["items"]] == [(made[0], "noop", "cancelled")]
    assert only["total"] == 1
    # the caller's jobs, even for an admin (the seed's get_user_jobs)
    assert (await callers.root.get_user_jobs())["items"] == []
    assert (await callers.bob.get_user_jobs())["total"] == 0


async def test_the_seeds_admin_routes(callers: Callers, worker: WorkerRunner) -> None:
    alice, bob, root = callers.alice, callers.bob, callers.root
    ok = await alice.create_job(JobCreate(job_type="noop", title="ok", parameters={"steps": 1}))
    bad = await bob.create_job(
        JobCreate(job_type="noop", title="bad", parameters={"steps": 1, "fail": True}, description="x")
    )
    held = await bob.create_job(JobCreate(job_type="noop", title="held", scheduled_for=later()))
    batch = await bob.http.post("/api/v1/jobs/batch", json={"type": "noop", "items": [{}, {}]})
    assert batch.status_code == 202, batch.text
    for job_id in (ok.id, bad.id):
        await alice.until_ended(job_id) if job_id == ok.id else await bob.until_ended(job_id)
    await bob.until_ended(batch.json()["id"])

    everyone = await root.get_all_jobs()
    assert (everyone["page"], everyone["per_page"], everyone["total"]) == (1, 50, 4)
    assert {(j["id"], j["owner"]) for j in everyone["items"]} == {
        (ok.id, "alice"), (bad.id, "bob"), (held.id, "bob"), (batch.json()["id"], "bob"),
    }  # fmt: skip
    noops = await root.get_all_jobs(job_type="noop")
    assert {j["id"] for j in noops["items"]} == {ok.id, bad.id, held.id}
    batches = await root.get_all_jobs(job_type="batch_noop")
    assert [j["id"] for j in batches["items"]] == [batch.json()["id"]]
    assert (await root.get_all_jobs(job_type="transcribe"))["items"] == []
    second = await root.get_all_jobs(page=2, per_page=3, status=None)
    assert (second["page"], second["per_page"], second["offset"], len(second["items"])) == (2, 3, 3, 1)
    failed = await root.get_all_jobs(status="failed", job_type="noop")
    assert [j["id"] for j in failed["items"]] == [bad.id]

    statistics = await root.get_job_statistics()
    totals = statistics["totals"]  # jobs, not batch parents: 3 singles and 2 children
    assert (totals["total"], totals["counts"]) == (5, {"completed": 3, "failed": 1, "scheduled": 1})
    assert (totals["success_rate"], totals["failure_rate"]) == (0.75, 0.25)
    assert 0 < totals["avg_run_s"] < 10
    assert statistics["by_type"]["noop"]["total"] == 5
    assert statistics["by_type"]["batch_noop"]["counts"] == {"completed": 1}
    assert statistics["queue"] == {
        "pending": 0, "running": 0, "pending_by_type": {}, "running_by_type": {}, "live_workers": 1,
        "workers_by_pool": {"cpu": 1},
    }  # fmt: skip

    queue = await root.get_queue_status()
    assert queue["pending_by_type"] == {}
    assert [w["name"] for w in queue["workers"]] == ["test-worker"]

    forced = await root.force_complete_job(held.id, {"note": "done by hand"})
    assert (forced["id"], forced["status"], forced["result"], forced["owner"]) == (
        held.id, "completed", {"note": "done by hand"}, "bob",
    )  # fmt: skip
    assert (await bob.get_job(held.id)).result == {"note": "done by hand"}
    spare = await bob.create_job(JobCreate(job_type="noop", title="spare", scheduled_for=later()))
    bare = await root.force_complete_job(spare.id)
    assert (bare["status"], bare["result"]) == ("completed", None)

    kept = await root.cleanup_old_jobs()
    assert (kept["days_old"], kept["deleted"]) == (30, 0)
    swept = await root.cleanup_old_jobs(days_old=0)
    assert (swept["deleted"], swept["completed"], swept["failed_kept"]) == (4, 4, 1)  # failed ones stay
    assert [j["id"] for j in (await root.get_all_jobs())["items"]] == [bad.id]


async def test_an_admin_key_reaches_any_owners_job_by_id(callers: Callers) -> None:
    # No worker: a retried job waits, pending, until it is cancelled again.
    alice, bob, root = callers.alice, callers.bob, callers.root
    theirs = await bob.create_job(JobCreate(job_type="noop", title="bob's", scheduled_for=later()))
    seen = await root.get_job(theirs.id)
    assert (seen.id, seen.title, seen.status) == (theirs.id, "bob's", "scheduled")
    missing = await alice.http.get(f"/api/v1/jobs/{theirs.id}")
    assert missing.json() == {"status_code": 404, "detail": f"job {theirs.id} not found"}
    for action in ("cancel", "retry"):
        refused = await alice.http.post(f"/api/v1/jobs/{theirs.id}/{action}")
        assert refused.status_code == 404, action
    assert (await root.cancel_job(theirs.id))["status"] == "cancelled"
    again = await root.retry_job(theirs.id)
    assert (again["owner"], again["attempt"]) == ("bob", 2)
    assert (await bob.get_job(theirs.id)).status == "pending"
    assert (await root.cancel_job(theirs.id))["attempt"] == 2
    assert (await alice.http.delete(f"/api/v1/jobs/{theirs.id}")).status_code == 404
    assert (await root.http.delete(f"/api/v1/jobs/{theirs.id}")).status_code == 204
    assert (await bob.http.get(f"/api/v1/jobs/{theirs.id}")).status_code == 404

    batch = await bob.http.post("/api/v1/jobs/batch", json={"type": "noop", "items": [{}, {}]})
    children = await root.http.get(f"/api/v1/jobs/{batch.json()['id']}/children")
    assert [c["owner"] for c in children.json()] == ["bob", "bob"]
    assert (await alice.http.get(f"/api/v1/jobs/{batch.json()['id']}/children")).status_code == 404


async def test_job_create_names_are_checked(callers: Callers) -> None:
    http = callers.alice.http
    cases = {
        "give exactly one of `type` or `job_type`": [
            {"type": "noop", "job_type": "noop"},
            {"title": "no type"},
            {"job_type": None},
        ],
        "give at most one of `params` or `parameters`": [{"type": "noop", "params": {}, "parameters": {}}],
        "Expected `int` <= 10": [{"job_type": "noop", "title": "t", "priority": 11}],
        "Object contains unknown field `user_id`": [{"job_type": "noop", "user_id": 1}],
    }
    for message, bodies in cases.items():
        for body in bodies:
            response = await http.post("/api/v1/jobs", json=body)
            assert response.status_code == 400, (body, response.text)
            assert message in response.text, (body, response.json())
    job = (await http.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 0}})).json()
    assert (job["type"], job["job_type"], job["params"]["steps"], job["description"]) == (
        "noop",
        "noop",
        0,
        "",
    )
    unknown = await http.post("/api/v1/jobs", json={"job_type": "nope", "title": "t"})
    assert unknown.status_code == 422
    assert "nope" in unknown.json()["detail"]


async def test_paging_and_type_filter_given_two_ways_are_refused(callers: Callers) -> None:
    http, root = callers.alice.http, callers.root.http
    for client, path in ((http, "/api/v1/jobs"), (root, "/api/v1/jobs/admin/all")):
        for params in ({"page": 1, "limit": 5}, {"per_page": 5, "offset": 0}):
            response = await client.get(path, params=params)
            assert response.json() == {
                "status_code": 400,
                "detail": "page through jobs with `page`/`per_page` or with `limit`/`offset`, not both",
            }
        both = await client.get(path, params={"type": "noop", "job_type": "noop"})
        assert both.json() == {"status_code": 400, "detail": "filter by `type` or by `job_type`, not both"}
        for params in ({"page": 0}, {"per_page": 501}, {"per_page": 0}):
            bad = await client.get(path, params=params)
            assert bad.status_code == 400
            assert next(iter(params)) in bad.text


async def test_an_admin_key_follows_any_owners_job_live(tenants: Tenants, worker: WorkerRunner) -> None:
    """SSE, long-poll, both WebSockets and the Compileo routes follow bob's job for root; alice,
    a user, gets the 404 of an unknown id on each."""
    job = (await tenants.bob.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 3}})).json()
    path = f"/api/v1/jobs/{job['id']}"
    headers = {"Authorization": f"Bearer {tenants.keys['root']}"}

    async with aconnect_sse(tenants.root, "GET", f"{path}/events") as source:
        kinds = [event.event async for event in source.aiter_sse() if event.event]
    assert (kinds[0], kinds[-1]) == ("submitted", "completed"), kinds
    polled = await tenants.root.get(f"{path}/poll", params={"timeout": 5, "since": 0})
    assert (polled.json()["id"], polled.json()["owner"]) == (job["id"], "bob")
    frames, code = await ws_frames(tenants.ws(f"{path}/ws"), additional_headers=headers)
    assert (frames[-1]["kind"], code) == ("completed", 1000)
    async with connect(tenants.ws("/api/v1/ws"), additional_headers=headers) as ws:
        await ws.send(json.dumps({"action": "subscribe", "job_ids": [job["id"]], "last_event_id": 0}))
        assert (await ws_json(ws)) == {"type": "subscribed", "job_ids": [job["id"]], "all": False}
        assert (await ws_json(ws))["kind"] == "submitted"
    status = await tenants.root.get(f"/api/v1/jobs/status/{job['id']}")
    assert (status.json()["job_id"], status.json()["status"]) == (job["id"], "completed")

    unknown = {"status_code": 404, "detail": f"job {job['id']} not found"}
    for route in (f"{path}/events", f"{path}/poll", f"/api/v1/jobs/status/{job['id']}"):
        answer = await tenants.alice.get(route)
        assert (answer.status_code, answer.json()) == (404, unknown), route
    alice = {"Authorization": f"Bearer {tenants.keys['alice']}"}
    frames, code = await ws_frames(tenants.ws(f"{path}/ws"), additional_headers=alice)
    assert (frames, code) == ([{"type": "error", **unknown}], 4404)
