"""No request gets a 500: any route and method, nasty headers, cookies, tokens and queries; an
unexpected error is logged with a request id that its 500 body and X-Request-ID header carry."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

from app import Settings, create_app
from app._auth import Keys
from app._queries import JobQueries
from jobcast.logs import configure
from streams import NatsServer
from tests.conftest import ApiServer, submit
from tests.test_security import put_key

LONG = 8000
"""Long enough to be silly, short enough for every HTTP parser's default header limit."""


@dataclass(frozen=True)
class Nasty:
    """One odd request."""

    method: str
    path: str
    headers: dict[str, bytes] = field(default_factory=dict)
    query: str = ""

    def __str__(self) -> str:
        return f"{self.method} {self.path}{'?' + self.query[:60] if self.query else ''} {self.headers!r:.120}"


def route_paths(settings: Settings) -> list[str]:
    """Every path the app routes (HTTP and WebSocket), with path parameters filled in."""
    app = create_app(settings)
    return sorted({re.sub(r"\{[^}]+\}", "x", route.path) for route in app.routes})


TARGETS = ["/api/v1/jobs", "/api/v1/jobs/admin/all", "/metrics", "/ui/jobs", "/api/v1/jobs/x/events",
           "/api/v1/files/x/content", "/v1/audio/transcriptions", "/api/v1/auth/token"]  # fmt: skip
"""Routes of every kind: a list, an admin one, a text one, a page, SSE, a download, OpenAI's, a POST."""

HEADER_VALUES: dict[str, list[bytes]] = {
    "Authorization": [
        "Bearer é".encode(),
        b"Bearer \xff\xfe",
        b"Bearer",
        b"Bearer  .",
        b"Basic Zm9vOmJhcg==",
        b"\xff",
        b"Bearer " + b"k" * LONG,
        b"bEaReR x",
    ],
    "X-API-Key": ["é".encode(), b"\xff\xfe", b"a" * LONG, b"-"],
    "Cookie": [
        "jobcast_session=é.é".encode(),
        b"jobcast_session=\xff.\xfe",
        b"jobcast_session=" + b"a" * LONG,
        b'jobcast_session="',
        b"jobcast_session=..; jobcast_session=e30.x",
        b";;=;\\",
        b"jobcast_session=.",
    ],
    "X-Request-ID": [b"\xff", b"a" * 1000, b"with space", "é".encode()],
    "Last-Event-ID": [b"\xff", b"-1", b"9" * 40, b"1e400"],
    "Accept": [b"\xff;q=x", b"*/*;q=" + b"9" * 100],
    "Range": [b"bytes=\xff-", b"bytes=99999999999999999999999-", b"bytes=-0", b"lines=1-2"],
    "Content-Type": [b"\xff/\xfe; charset=\xff", b"multipart/form-data; boundary=", b"application/json; x"],
}
QUERIES = [
    "token=" + "%C3%A9.%C3%A9", "token=%FF%FE.%FF", "token=" + "t" * LONG, "token=.", "token=e30.x",
    "limit=%ZZ&offset=1e400&status=%FF", "limit=99999999999999999999999", "offset=-1", "type=" + "%00" * 50,
    "after=%FF", "page=0", "%FF=%FF", "&&&==&", "status=" + "pending&status=" * 300 + "x",
]  # fmt: skip


def nasty_requests(settings: Settings) -> list[Nasty]:
    """OPTIONS and HEAD on every route, then each odd header value and query on each target."""
    cases = [Nasty(method, path) for path in route_paths(settings) for method in ("OPTIONS", "HEAD")]
    for path in TARGETS:
        method = "POST" if path in ("/v1/audio/transcriptions", "/api/v1/auth/token") else "GET"
        cases += [
            Nasty(method, path, {name: value}) for name, values in HEADER_VALUES.items() for value in values
        ]
        cases += [Nasty(method, path, query=query) for query in QUERIES]
    return cases


def says_what_was_wrong(case: Nasty, response: httpx.Response) -> str | None:
    """Why the answer is not acceptable, or None: < 500, a request id, and an error body that explains."""
    if response.status_code >= 500:
        return f"{response.status_code} {response.text[:300]}"
    if not response.headers.get("x-request-id"):
        return "no X-Request-ID"
    if response.status_code < 400 or case.method == "HEAD":
        return None  # a success, a redirect (pages go to the login form), or a bodiless HEAD answer
    if case.path.startswith("/ui"):
        return (
            None
            if "text/html" in response.headers["content-type"] and "Error" in response.text
            else "no page"
        )
    if response.headers["content-type"] != "application/json":
        return f"content type {response.headers['content-type']}"
    body = response.json()
    if case.path.startswith("/v1/"):  # OpenAI's error shape, as its clients parse it
        return None if body["error"]["message"] else "no message"
    return None if isinstance(body.get("detail"), str) and body["detail"] else f"no detail: {body}"


@pytest.fixture(params=["local", "keys"])
async def api_with(request: pytest.FixtureRequest, nats_server: NatsServer, settings: Settings) -> AsyncIterator[
    tuple[ApiServer, str | None]
]:  # fmt: skip
    """The API in local mode (no key), or with an admin key; yields it and the key."""
    key = await put_key(nats_server.url, "root", admin=True) if request.param == "keys" else None
    server = ApiServer(settings)
    await server.start()
    yield server, key
    await server.stop()


@pytest.mark.slow
async def test_nasty_requests_get_a_clear_answer_never_a_500(api_with: tuple[ApiServer, str | None]) -> None:
    api, key = api_with
    cases = nasty_requests(api.settings)
    assert len(cases) > 400
    assert any(case.path == "/api/v1/jobs/admin/all" and case.method == "OPTIONS" for case in cases)
    wrong: list[str] = []
    callers = [{}, {"X-API-Key": key.encode()}] if key else [{}]
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        for caller in callers:
            for case in cases:
                headers = {**caller, **case.headers}
                url = f"{case.path}?{case.query}" if case.query else case.path
                response = await http.request(case.method, url, headers=headers)
                if (problem := says_what_was_wrong(case, response)) is not None:
                    wrong.append(f"{case} ({'admin' if caller else 'anonymous'}): {problem}")
        options = await http.options("/api/v1/jobs/admin/all", headers={"X-API-Key": key or ""})
    wrong.sort(key=lambda line: ": 500 " not in line)  # server errors first
    assert wrong == [], f"{len(wrong)} wrong answers:\n" + "\n".join(wrong[:40])
    assert options.status_code == 204  # the admin (or the local owner) is told what the route allows
    assert set(options.headers["allow"].split(", ")) == {"GET", "OPTIONS"}


async def test_anonymous_options_on_an_admin_route_is_refused_as_any_request(
    api_with: tuple[ApiServer, str | None],
) -> None:
    api, key = api_with
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await http.options("/api/v1/jobs/admin/all")
        user_key = await put_key(api.settings.nats_url, "alice") if key else None
        as_user = await http.options("/api/v1/jobs/admin/statistics", headers={"X-API-Key": user_key or ""})
    if key:
        assert response.status_code == 401
        assert response.json()["detail"].startswith("an API key is required")
        assert as_user.status_code == 403
        assert as_user.json() == {"status_code": 403, "detail": "this route needs an admin key"}
    else:  # local mode: the local owner is the admin
        assert response.status_code == as_user.status_code == 204


async def test_bytes_no_http_parser_accepts_get_a_400_from_the_server_itself(api: ApiServer) -> None:
    # Raw non-ASCII in the request target and unknown methods never reach the app: uvicorn answers
    # them (text, not JSON), and never with a 500.
    for raw in (b"GET /api/v1/jobs?token=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"):  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 400 "), (raw, status_line)


async def test_request_id_is_sent_on_every_answer_and_a_sane_one_is_kept(client: httpx.AsyncClient) -> None:
    mine = await client.get("/health", headers={"X-Request-ID": "abc-123.x:y_z"})
    missing = await client.get("/no/such/route", headers={"X-Request-ID": "has space"})
    fresh = [(await client.get("/health")).headers["x-request-id"] for _ in range(3)]
    assert mine.headers["x-request-id"] == "abc-123.x:y_z"
    assert missing.status_code == 404
    assert missing.json() == {"status_code": 404, "detail": "Not Found"}
    assert re.fullmatch(r"[0-9a-f]{32}", missing.headers["x-request-id"])  # an unusable one is replaced
    assert len(set(fresh)) == 3


async def test_sse_and_websocket_streams_still_work_with_the_request_id(api: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        job = await submit(http, type="noop", params={"steps": 1})
        async with aconnect_sse(http, "GET", f"/api/v1/jobs/{job['id']}/events") as source:
            assert re.fullmatch(r"[0-9a-f]{32}", source.response.headers["x-request-id"])
            assert source.response.headers["content-type"].startswith("text/event-stream")
            first = await anext(aiter(source.aiter_sse()))
        assert first.event == "submitted"
        async with connect(api.url.replace("http://", "ws://") + f"/api/v1/jobs/{job['id']}/ws") as ws:
            assert '"kind":"submitted"' in str(await ws.recv())
            assert ws.response is not None
            assert re.fullmatch(r"[0-9a-f]{32}", ws.response.headers["x-request-id"])


def documented_body_problem(
    schema: dict[str, Any], path: str, method: str, response: httpx.Response
) -> str | None:
    """Why the answer is not what the schema documents for its status (None when it is)."""
    documented = schema["paths"][path][method]["responses"].get(str(response.status_code))
    if documented is None:
        return f"{response.status_code} is not documented"
    media = documented.get("content", {}).get("application/json")
    if media is None:
        return None  # not a JSON answer (204, a stream, a file)
    name = media["schema"]["$ref"].rsplit("/", 1)[-1]
    required = set(schema["components"]["schemas"][name].get("required", ()))
    body = response.json()
    return None if required <= set(body) else f"{response.status_code} body {body} is not a {name}"


@pytest.mark.parametrize("api_with", ["keys"], indirect=True)
async def test_every_route_answers_an_anonymous_caller_with_the_error_body_it_documents(
    api_with: tuple[ApiServer, str | None],
) -> None:
    api, _ = api_with
    wrong = []
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        schema = (await http.get("/schema/openapi.json")).json()
        for path, item in schema["paths"].items():
            for method in item:
                response = await http.request(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
                if (problem := documented_body_problem(schema, path, method, response)) is not None:
                    wrong.append(f"{method.upper()} {path}: {problem}")
    assert wrong == []
    assert len(schema["paths"]) >= 25


async def test_ready_answers_503_with_the_health_body_it_documents(
    api: ApiServer, nats_server: NatsServer
) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        schema = (await http.get("/schema/openapi.json")).json()
        await nats_server.stop()
        for _ in range(200):  # NATS's client notices the server is gone within a second or so
            response = await http.get("/ready")
            if response.status_code == 503:
                break
            await asyncio.sleep(0.1)
    assert response.json()["nats"] is False
    assert documented_body_problem(schema, "/ready", "get", response) is None


class BrokenError(RuntimeError):
    """Raised by a service method broken for a test."""


def break_method(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, message: str) -> None:
    """Make `owner.name` raise BrokenError, as a dependency that broke under the app would."""

    def broken(*_: Any, **__: Any) -> Any:
        raise BrokenError(message)

    async def broken_async(*_: Any, **__: Any) -> Any:
        raise BrokenError(message)

    is_async = inspect.iscoroutinefunction(getattr(owner, name))
    monkeypatch.setattr(owner, name, broken_async if is_async else broken)


def internal_error(rid: str) -> dict[str, object]:
    """The body of a 500."""
    return {"status_code": 500, "detail": f"internal error; request id {rid}", "request_id": rid}


async def test_an_unexpected_error_is_a_500_naming_the_request_id_in_body_header_and_log(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    break_method(monkeypatch, JobQueries, "find", "the database went away")
    caplog.set_level(logging.ERROR, logger="jobcast.api")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await http.get("/api/v1/jobs", params={"limit": 5})
        page = await http.get("/ui/jobs")
        given = await http.get("/api/v1/jobs", headers={"X-Request-ID": "client-chosen-1"})
    rid = response.headers["x-request-id"]
    assert response.status_code == 500
    assert response.json() == internal_error(rid)
    assert "database went away" not in response.text  # the details are for the log, not the client
    assert given.json()["request_id"] == given.headers["x-request-id"] == "client-chosen-1"
    assert page.status_code == 500
    assert "text/html" in page.headers["content-type"]
    assert page.headers["x-request-id"] in page.text
    records = {getattr(r, "request_id", None): r for r in caplog.records if r.name == "jobcast.api"}
    record = records[rid]
    assert (record.levelno, record.method, record.path) == (logging.ERROR, "GET", "/api/v1/jobs")
    assert record.exc_info is not None
    assert record.exc_info[0] is BrokenError
    assert rid in record.getMessage()
    assert "/api/v1/jobs" in record.getMessage()
    assert page.headers["x-request-id"] in records
    assert records["client-chosen-1"].path == "/api/v1/jobs"


@pytest.mark.parametrize("api_with", ["keys"], indirect=True)
async def test_an_unexpected_error_in_the_auth_middleware_is_a_logged_500_too(
    api_with: tuple[ApiServer, str | None], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    api, key = api_with

    break_method(monkeypatch, Keys, "lookup", "keys unreadable")
    caplog.set_level(logging.ERROR, logger="jobcast.api")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    rid = response.headers["x-request-id"]
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"  # not the route's text/plain
    assert response.json() == internal_error(rid)
    [record] = [r for r in caplog.records if getattr(r, "request_id", None) == rid]
    assert record.path == "/metrics"
    assert record.exc_info is not None
    assert record.exc_info[0] is BrokenError


async def test_an_unexpected_error_on_a_websocket_is_logged_with_a_request_id(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    break_method(monkeypatch, JobQueries, "get", "no job table")
    caplog.set_level(logging.ERROR, logger="jobcast.api")
    async with connect(api.url.replace("http://", "ws://") + "/api/v1/jobs/x/ws") as ws:
        await ws.wait_closed()
    assert ws.close_code == 4500
    [record] = [r for r in caplog.records if getattr(r, "path", None) == "/api/v1/jobs/x/ws"]
    assert record.method == "WEBSOCKET"
    assert re.fullmatch(r"[0-9a-f]{32}", record.request_id)
    assert record.exc_info is not None
    assert record.exc_info[0] is BrokenError


def test_the_api_keeps_the_process_json_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    try:
        create_app(Settings(data_dir=tmp_path))  # Litestar's own logging config would replace the handler
        logging.getLogger("jobcast.api").error("boom", extra={"request_id": "r-1", "path": "/x"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        logging.basicConfig(force=True)
    entry = json.loads(line)
    assert (entry["message"], entry["request_id"], entry["path"]) == ("boom", "r-1", "/x")


async def test_an_expected_error_is_not_logged_as_unexpected(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="jobcast.api")
    no_file = await client.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
    missing = await client.get("/api/v1/jobs/nope")
    assert no_file.status_code == 400
    assert no_file.json()["error"]["param"] == "file"
    assert missing.status_code == 404
    assert [r for r in caplog.records if r.name == "jobcast.api"] == []


async def test_a_websocket_whose_stream_fails_is_logged_with_a_request_id(
    api: ApiServer,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The failure happens in a task of the connection, after the handshake: the handler itself
    # returns normally, so only the handler's own logging can say what happened.
    job = await submit(client, params={"steps": 0})
    break_method(monkeypatch, JobQueries, "history", "history lost")
    caplog.set_level(logging.ERROR, logger="jobcast.api")
    path = f"/api/v1/jobs/{job['id']}/ws"
    async with connect(api.url.replace("http://", "ws://") + path) as ws:
        await asyncio.wait_for(ws.wait_closed(), 10)
    [record] = [r for r in caplog.records if getattr(r, "path", None) == path]
    assert record.method == "WEBSOCKET"
    assert re.fullmatch(r"[0-9a-f]{32}", record.request_id)
    assert record.exc_info is not None
    assert record.exc_info[0] is BrokenError
