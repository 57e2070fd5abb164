"""The REST surface: submit, get, list, errors, probes, OpenAPI, failure and retry."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import WorkerRunner, submit, wait_terminal

JOB_FIELDS = {
    "id", "type", "status", "title", "description", "params", "progress", "current_step", "result",
    "error", "attempt", "owner", "parent_id", "created_at", "started_at", "completed_at", "updated_at",
    "last_event_id",
}  # fmt: skip
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


async def test_submit_returns_full_job_with_defaults(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/jobs", json={"type": "noop", "params": {"steps": 2}, "title": "t", "description": "d"}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert set(job) >= JOB_FIELDS, JOB_FIELDS - set(job)
    uuid.UUID(job["id"])
    assert job["type"] == "noop"
    assert job["status"] == "pending"
    assert job["title"] == "t"
    assert job["description"] == "d"
    assert job["params"] == {**NOOP_DEFAULTS, "steps": 2}
    assert job["progress"] == 0.0
    assert job["result"] is None
    assert job["error"] is None
    assert job["attempt"] == 1
    assert isinstance(job["owner"], str)
    assert job["owner"]
    assert job["parent_id"] is None
    assert job["created_at"]
    assert job["updated_at"]
    assert job["started_at"] is None
    assert job["completed_at"] is None
    assert isinstance(job["last_event_id"], int)
    assert job["last_event_id"] >= 1


async def test_get_right_after_post_sees_the_job(client: httpx.AsyncClient) -> None:
    for i in range(20):
        job = await submit(client, params={"steps": 1}, title=f"ryw {i}")
        response = await client.get(f"/api/v1/jobs/{job['id']}")
        assert response.status_code == 200, response.text
        fetched = response.json()
        assert fetched["status"] == "pending"
        assert fetched == job


async def test_unknown_type_is_422_naming_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/jobs", json={"type": "nope", "params": {}})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["status_code"] == 422
    assert "type" in body["detail"]
    assert "'nope'" in body["detail"]
    assert "known operations: " in body["detail"]
    assert "noop" in body["detail"].split("known operations: ")[1]


async def test_bad_params_are_422_naming_the_field(client: httpx.AsyncClient) -> None:
    for steps in ("x", -1):
        response = await client.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": steps}})
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["status_code"] == 422
        assert "$.params.steps" in body["detail"], body
    response = await client.post("/api/v1/jobs", json={"type": "noop", "params": {"bogus": 1}})
    assert response.status_code == 422, response.text
    body = response.json()
    assert "bogus" in body["detail"], body
    assert "$.params" in body["detail"], body


async def test_missing_type_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/jobs", json={"params": {}})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["status_code"] == 400
    assert "type" in json.dumps(body)


@pytest.mark.parametrize(
    ("path", "extra"),
    [("/api/v1/jobs", {}), ("/api/v1/jobs/batch", {"items": [{}]})],
)
async def test_a_flag_takes_only_true_or_false(
    client: httpx.AsyncClient, path: str, extra: dict[str, Any]
) -> None:
    """`cache: 0` or `"true"` is refused, as the schema says (Litestar's lax decoding took them)."""
    for value in (0, 1, "true", "0"):
        response = await client.post(path, json={"type": "noop", "cache": value, **extra})
        assert response.status_code == 400, (value, response.text)
        assert "cache" in json.dumps(response.json()), response.text
    response = await client.post(path, json={"type": "noop", "cache": False, **extra})
    assert response.status_code == 202, response.text
    assert response.json()["type"] in {"noop", "batch_noop"}


async def test_non_json_body_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/jobs", content=b"this is not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["status_code"] == 400
    assert body["detail"]


async def test_get_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    job_id = str(uuid.uuid4())
    response = await client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 404
    assert response.json() == {"status_code": 404, "detail": f"job {job_id} not found"}


async def test_list_filters_by_status_newest_first(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    ok = [await submit(client, params={"steps": 1}, title=f"ok{i}") for i in range(2)]
    bad = [await submit(client, params={"steps": 1, "fail": True}, title=f"bad{i}") for i in range(2)]
    for job in ok + bad:
        await wait_terminal(client, job["id"], timeout=8)

    response = await client.get("/api/v1/jobs", params=[("status", "completed"), ("status", "failed")])
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["total"] == 4
    ids = [item["id"] for item in page["items"]]
    assert ids == [job["id"] for job in reversed(ok + bad)]
    assert {item["status"] for item in page["items"]} == {"completed", "failed"}

    failed = (await client.get("/api/v1/jobs", params={"status": "failed"})).json()
    assert failed["total"] == 2
    assert [item["id"] for item in failed["items"]] == [bad[1]["id"], bad[0]["id"]]
    assert all(item["error"] == "noop failed on request" for item in failed["items"])

    completed = (await client.get("/api/v1/jobs", params={"status": "completed", "type": "noop"})).json()
    assert [item["id"] for item in completed["items"]] == [ok[1]["id"], ok[0]["id"]]

    other = (await client.get("/api/v1/jobs", params={"type": "transcribe"})).json()
    assert other["items"] == []
    assert other["total"] == 0


async def test_list_active_and_pagination(client: httpx.AsyncClient) -> None:
    jobs = [await submit(client, params={"steps": 1}, title=f"j{i}") for i in range(5)]
    newest_first = [job["id"] for job in reversed(jobs)]

    active = (await client.get("/api/v1/jobs", params={"active": "true"})).json()
    assert active["total"] == 5
    assert [item["id"] for item in active["items"]] == newest_first
    assert {item["status"] for item in active["items"]} == {"pending"}

    typed = (await client.get("/api/v1/jobs", params={"type": "noop"})).json()
    assert typed["total"] == 5

    pages = []
    for offset in (0, 2, 4):
        page = (await client.get("/api/v1/jobs", params={"limit": 2, "offset": offset})).json()
        assert page["total"] == 5
        assert page["limit"] == 2
        assert page["offset"] == offset
        pages.append([item["id"] for item in page["items"]])
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]

    beyond = (await client.get("/api/v1/jobs", params={"limit": 2, "offset": 10})).json()
    assert beyond["items"] == []
    assert beyond["total"] == 5

    done = (await client.get("/api/v1/jobs", params={"active": "true", "status": "completed"})).json()
    assert done == {"items": [], "total": 0, "limit": 20, "offset": 0, "page": 1, "per_page": 20}


async def test_list_rejects_bad_query(client: httpx.AsyncClient) -> None:
    cases: list[dict[str, Any]] = [{"status": "bogus"}, {"limit": 0}, {"limit": 501}, {"offset": -1}]
    for params in cases:
        response = await client.get("/api/v1/jobs", params=params)
        assert response.status_code == 400, (params, response.text)
        body = response.json()
        assert body["status_code"] == 400
        name = next(iter(params))
        assert name in json.dumps(body), (params, body)


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    ready = await client.get("/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert body["nats"] is True
    assert body["applied_seq"] >= body["stream_seq"] or body["stream_seq"] == 0


async def test_openapi_lists_job_paths(client: httpx.AsyncClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/events",
        "/api/v1/jobs/{job_id}/poll",
        "/api/v1/jobs/status/{job_id}",
        "/api/v1/jobs/status/{job_id}/poll",
        "/api/v1/jobs/status/{job_id}/stream",
    ):
        assert path in paths, sorted(paths)
    assert "post" in paths["/api/v1/jobs"]
    assert "get" in paths["/api/v1/jobs"]


async def test_permanent_failure_does_not_retry(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 2, "fail": True, "error": "boom"})
    done = await wait_terminal(client, job["id"], timeout=8)
    assert done["status"] == "failed"
    assert done["error"] == "boom"
    assert done["attempt"] == 1
    assert done["result"] is None
    assert done["completed_at"] is not None


@pytest.mark.slow
async def test_transient_failure_retries_then_completes(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 1, "fail_times": 1})
    done = await wait_terminal(client, job["id"], timeout=8)
    assert done["status"] == "completed"
    assert done["attempt"] == 2
    assert done["error"] is None
    assert done["result"] == {"steps": 1, "duration_s": 0.0, "delivery": 2}

    kinds: list[str] = []
    async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job['id']}/events") as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            if sse.event:
                kinds.append(sse.event)
                assert json.loads(sse.data)["job_id"] == job["id"]
    assert kinds[0] == "submitted"
    assert "retrying" in kinds
    assert kinds.index("retrying") < kinds.index("completed")
    assert kinds[-1] == "completed"
