"""An unknown query parameter is a 400 naming it, on every route of the app (HTTP and WebSocket), and
every parameter a route declares (repeated, aliased, its dependencies', `?token=`) still works."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from litestar.routes import HTTPRoute, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import ApiServer, submit

UNKNOWN = "no_such_param"
UNKNOWN_EXTRA = [{"message": "unknown query parameter", "key": UNKNOWN, "source": "query"}]
PATH_PARAM = re.compile(r"\{(\w+):(\w+)\}")


def concrete(path: str) -> str:
    """A route's path with its parameters filled in (a real static file for `path` ones)."""
    return PATH_PARAM.sub(lambda m: "jobcast.js" if m[2] == "path" else "some-id", path)


def every_route(api: ApiServer) -> tuple[list[tuple[str, str]], list[str]]:
    """(method, path) of every HTTP handler, and the path of every WebSocket route, of the running app."""
    assert api.app is not None
    http: list[tuple[str, str]] = []
    sockets: list[str] = []
    for route in api.app.routes:
        if isinstance(route, WebSocketRoute):
            sockets.append(concrete(route.path))
        elif isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                http += [(method, concrete(route.path)) for method in sorted(handler.http_methods)]
        else:
            pytest.fail(f"a route of a kind this test does not know: {route!r}")
    return http, sockets


async def test_every_route_refuses_an_unknown_query_parameter(
    api: ApiServer, client: httpx.AsyncClient
) -> None:
    http, sockets = every_route(api)
    assert len(http) > 60
    assert {"/api/v1/ws", "/api/v1/jobs/some-id/ws"} <= set(sockets)
    paths = {path for _, path in http}
    for wanted in ("/api/v1/jobs", "/api/v1/jobs/admin/all", "/v1/audio/transcriptions", "/metrics",
                   "/health", "/ready", "/schema/openapi.json", "/ui/jobs", "/ui/static/jobcast.js", "/"):  # fmt: skip
        assert wanted in paths, wanted
    in_error_body = 0
    for method, path in http:
        response = await client.request(method, path, params={UNKNOWN: "1"})
        assert response.status_code == 400, (method, path, response.status_code, response.text[:300])
        if method == "HEAD":
            continue  # no body to name it in
        # Every answer names it; UI pages in the error page, the OpenAI route in OpenAI's shape...
        assert UNKNOWN in response.text, (method, path, response.text[:300])
        assert "unknown query parameter" in response.text, (method, path, response.text[:300])
        if (
            response.headers["content-type"].startswith("application/json")
            and "status_code" in response.json()
        ):
            body = response.json()  # ... and the rest in jobcast's error body
            assert body["status_code"] == 400, (method, path, body)
            assert body["extra"] == UNKNOWN_EXTRA, (method, path, body)
            assert body["detail"].startswith(f"unknown query parameter '{UNKNOWN}'; this route takes: ")
            in_error_body += 1
    assert in_error_body > 50
    ui_page = await client.get("/ui/jobs", params={UNKNOWN: "1"})
    assert ui_page.headers["content-type"].startswith("text/html")
    openai = await client.post("/v1/audio/transcriptions", params={UNKNOWN: "1"})
    assert openai.json()["error"]["type"] == "invalid_request_error"
    for path in sockets:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{api.url.replace('http', 'ws')}{path}?{UNKNOWN}=1"):
                pass
        answer = refused.value.response
        assert answer.status_code == 400, path
        assert answer.headers["x-request-id"]
        body = json.loads(answer.body or b"{}")
        assert body["extra"] == UNKNOWN_EXTRA, (path, body)
        assert UNKNOWN in body["detail"], (path, body)


async def test_the_error_names_each_unknown_and_what_the_route_takes(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/files", params={"limit": 1, "jobid": "x", "sort": "name"})
    assert response.status_code == 400
    assert response.json() == {
        "status_code": 400,
        "detail": "unknown query parameters 'jobid', 'sort'; this route takes: job_id, limit, offset",
        "extra": [
            {"message": "unknown query parameter", "key": "jobid", "source": "query"},
            {"message": "unknown query parameter", "key": "sort", "source": "query"},
        ],
    }
    health = await client.get("/health", params={"verbose": "1"})
    assert health.json()["detail"] == "unknown query parameter 'verbose'; this route takes: none"
    blank = await client.get("/api/v1/jobs?limt")  # a name without a value is still a name
    assert (blank.status_code, blank.json()["extra"][0]["key"]) == (400, "limt")


async def test_declared_parameters_still_work(client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"steps": 1}, title="kept")
    token = (await client.post("/api/v1/auth/token")).json()["token"]
    repeated = await client.get(
        "/api/v1/jobs",
        params=[("status", "pending"), ("status", "running"), ("type", "noop"), ("token", token)],
    )
    assert repeated.status_code == 200, repeated.text
    assert [j["id"] for j in repeated.json()["items"]] == [job["id"]]
    by_alias = await client.get("/api/v1/jobs/admin/all", params={"owner": job["owner"], "type": "noop"})
    assert [j["id"] for j in by_alias.json()["items"]] == [job["id"]]
    poll = await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 1, "since": 0})
    assert poll.json()["id"] == job["id"]
    page = await client.get("/ui/jobs", params=[("status", "pending"), ("type", "noop"), ("page", 1)])
    assert page.status_code == 200
    assert "kept" in page.text
    summary = await client.get(f"/ui/jobs/{job['id']}", params={"part": "summary"})
    assert summary.status_code == 200
    login = await client.get("/ui/login", params={"next": "/ui/jobs"}, follow_redirects=False)
    assert (login.status_code, login.headers["location"]) == (303, "/ui/jobs")  # no keys: straight in
    assert (await client.get("/ui/static/jobcast.js")).status_code == 200
    assert (await client.get("/schema/openapi.json")).status_code == 200
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    deleted = await client.delete(f"/api/v1/jobs/{job['id']}", params={"files": "true"})
    assert deleted.status_code == 204
