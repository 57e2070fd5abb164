"""API keys, tenant isolation, admin guard, tokens and cookies, local-mode refusal, webhook guard."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app import Settings, create_app
from app._auth import Caller, sign_token
from streams import ApiKeyRecord, NatsServer, close_quietly, key_hash, keys_bucket
from streams import connect as nats_connect
from tests.conftest import REPO, ApiServer, WorkerRunner, free_port, submit, wait_terminal
from tests.test_admin import Receiver, wait_for

NEED_KEY = {
    "status_code": 401,
    "detail": "an API key is required: send Authorization: Bearer <key> or X-API-Key",
}
BAD_KEY = {"status_code": 401, "detail": "invalid API key"}
BAD_TOKEN = {"status_code": 401, "detail": "invalid or expired token; log in again"}
NOT_ADMIN = {"status_code": 403, "detail": "this route needs an admin key"}


async def put_key(nats_url: str, name: str, admin: bool = False) -> str:
    """Store a fresh key for `name` in the keys bucket, as `jobcast keys create` does; returns it."""
    key = secrets.token_urlsafe(24)
    nc = await nats_connect(nats_url, "t")
    try:
        kv = await keys_bucket(nc.jetstream())
        record = ApiKeyRecord(name=name, sha256=key_hash(key), admin=admin)
        await kv.put(name, msgspec.json.encode(record))
    finally:
        await close_quietly(nc)
    return key


class Tenants:
    """The API with keys for alice, bob (users) and root (admin), and a client per key."""

    def __init__(self, api: ApiServer, keys: dict[str, str], clients: dict[str, httpx.AsyncClient]) -> None:
        self.api = api
        self.keys = keys
        self.alice, self.bob, self.root = clients["alice"], clients["bob"], clients["root"]
        self.anon = clients["anon"]

    def ws(self, path: str) -> str:
        return self.api.url.replace("http://", "ws://") + path


@pytest.fixture
async def tenants(nats_server: NatsServer, settings: Settings) -> AsyncIterator[Tenants]:
    keys = {
        "alice": await put_key(nats_server.url, "alice"),
        "bob": await put_key(nats_server.url, "bob"),
        "root": await put_key(nats_server.url, "root", admin=True),
    }
    server = ApiServer(settings)
    await server.start()
    clients = {
        name: httpx.AsyncClient(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {key}"})
        for name, key in keys.items()
    }
    clients["anon"] = httpx.AsyncClient(base_url=server.url, timeout=30)
    try:
        yield Tenants(server, keys, clients)
    finally:
        for http in clients.values():
            await http.aclose()
        await server.stop()


async def ws_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def ws_frames(url: str, **options: Any) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame until the server closes, and the close code."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10), connect(url, **options) as ws:
        try:
            while True:
                frames.append(await ws_json(ws))
        except ConnectionClosed:
            pass
        return frames, ws.close_code


async def upload(http: httpx.AsyncClient, name: str, data: bytes) -> dict[str, Any]:
    response = await http.post("/api/v1/files", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 201, response.text
    info: dict[str, Any] = response.json()
    return info


# 1. keys are required ----------------------------------------------------------------------


async def test_no_key_or_wrong_key_is_401_and_probes_stay_open(tenants: Tenants) -> None:
    anon = tenants.anon
    for method, path in [("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/files"),
                         ("GET", "/api/v1/jobs/queue/stats"), ("GET", "/api/v1/jobs/admin/all"),
                         ("POST", "/api/v1/auth/token")]:  # fmt: skip
        response = await anon.request(method, path, json={"type": "noop"} if method == "POST" else None)
        assert (response.status_code, response.json()) == (401, NEED_KEY), path
    for headers in ({"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}):
        response = await anon.get("/api/v1/jobs", headers=headers)
        assert (response.status_code, response.json()) == (401, BAD_KEY)
    # X-API-Key works like Bearer
    ok = await anon.get("/api/v1/jobs", headers={"X-API-Key": tenants.keys["alice"]})
    assert ok.status_code == 200
    assert ok.json()["total"] == 0
    with pytest.raises(InvalidStatus) as refused:
        async with connect(tenants.ws("/api/v1/ws")):
            pass
    assert refused.value.response.status_code == 403  # a refused ASGI handshake
    assert (await anon.get("/health")).status_code == 200
    assert (await anon.get("/ready")).status_code == 200
    schema = await anon.get("/schema/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["info"]["title"] == "jobcast"


# 2. tenants see only their own --------------------------------------------------------------


@pytest.mark.slow
async def test_cross_tenant_matrix(tenants: Tenants, worker: WorkerRunner) -> None:
    alice, bob = tenants.alice, tenants.bob
    mine = await submit(alice, params={"steps": 1})
    done = await submit(bob, params={"steps": 1})
    batch = (await bob.post("/api/v1/jobs/batch", json={"type": "noop", "items": [{}, {}]})).json()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    waiting = await submit(bob, scheduled_for=later)
    assert waiting["status"] == "scheduled"
    bob_file = await upload(bob, "bob.bin", b"bob's secret bytes")
    alice_file = await upload(alice, "alice.bin", b"alice")
    for job_id in (mine["id"], done["id"], batch["id"]):
        await wait_terminal(alice if job_id == mine["id"] else bob, job_id)
    children = (await bob.get(f"/api/v1/jobs/{batch['id']}/children")).json()
    assert len(children) == 2
    bob_jobs = [done["id"], batch["id"], waiting["id"], *(c["id"] for c in children)]
    before = {job_id: (await bob.get(f"/api/v1/jobs/{job_id}")).json() for job_id in bob_jobs}

    job_routes = [
        ("GET", "/api/v1/jobs/{}"), ("GET", "/api/v1/jobs/{}/children"), ("GET", "/api/v1/jobs/{}/events"),
        ("GET", "/api/v1/jobs/{}/poll?timeout=1"), ("GET", "/api/v1/jobs/status/{}"),
        ("GET", "/api/v1/jobs/status/{}/poll?timeout=1"), ("GET", "/api/v1/jobs/status/{}/stream"),
        ("POST", "/api/v1/jobs/{}/cancel"), ("POST", "/api/v1/jobs/cancel/{}"),
        ("POST", "/api/v1/jobs/{}/retry"), ("POST", "/api/v1/jobs/restart/{}"),
        ("DELETE", "/api/v1/jobs/{}"), ("DELETE", "/api/v1/jobs/{}?files=true"),
    ]  # fmt: skip
    file_routes = [
        ("GET", "/api/v1/files/{}"),
        ("GET", "/api/v1/files/{}/content"),
        ("DELETE", "/api/v1/files/{}"),
    ]

    async def same_as_unknown(method: str, template: str, theirs: str) -> None:
        unknown = str(uuid.uuid4())
        got = await alice.request(method, template.format(theirs))
        ref = await alice.request(method, template.format(unknown))
        assert ref.status_code == 404, (template, ref.text)
        assert got.status_code == 404, (template, got.text)
        assert got.headers["content-type"] == ref.headers["content-type"]
        assert got.text.replace(theirs, "ID") == ref.text.replace(unknown, "ID"), template
        assert "ID not found" in got.text.replace(theirs, "ID")

    for job_id in bob_jobs:
        for method, template in job_routes:
            await same_as_unknown(method, template, job_id)
    for method, template in file_routes:
        await same_as_unknown(method, template, bob_file["id"])

    # WebSocket per job, with the key as header and as a token: the unknown-id answer
    token = (await alice.post("/api/v1/auth/token")).json()["token"]
    for job_id in (done["id"], str(uuid.uuid4())):
        expected = [{"type": "error", "status_code": 404, "detail": f"job {job_id} not found"}]
        by_header = await ws_frames(
            tenants.ws(f"/api/v1/jobs/{job_id}/ws"), additional_headers={"X-API-Key": tenants.keys["alice"]}
        )
        by_token = await ws_frames(tenants.ws(f"/api/v1/jobs/{job_id}/ws?token={token}"))
        assert by_header == by_token == (expected, 4404)

    # lists filtered by bob's ids are empty, exactly like unknown ids
    empty_jobs = {"items": [], "total": 0, "limit": 20, "offset": 0, "page": 1, "per_page": 20}
    for params in ({"parent_id": batch["id"]}, {"parent_id": str(uuid.uuid4())}):
        listed = await alice.get("/api/v1/jobs", params=params)
        assert listed.json() == empty_jobs
    for params in ({"job_id": done["id"]}, {"job_id": str(uuid.uuid4())}):
        listed = await alice.get("/api/v1/files", params=params)
        assert listed.json()["items"] == []
        assert listed.json()["total"] == 0

    # alice's own views hold only her things
    for params in ({}, {"include_children": "true"}, {"status": "scheduled"}):
        page = (await alice.get("/api/v1/jobs", params=params)).json()
        assert [j["id"] for j in page["items"] if j["status"] != "scheduled"] == (
            [mine["id"]] if not params.get("status") else []
        )
        assert {j["owner"] for j in page["items"]} <= {"alice"}
    files = (await alice.get("/api/v1/files")).json()
    assert [f["id"] for f in files["items"]] == [alice_file["id"]]
    stats = (await alice.get("/api/v1/jobs/queue/stats")).json()
    assert (stats["total_jobs"], stats["completed_jobs"], stats["scheduled_jobs"]) == (1, 1, 0)
    bob_stats = (await bob.get("/api/v1/jobs/queue/stats")).json()
    assert bob_stats["scheduled_jobs"] == 1
    assert bob_stats["total_jobs"] >= 3

    # nothing of bob's changed
    after = {job_id: (await bob.get(f"/api/v1/jobs/{job_id}")).json() for job_id in bob_jobs}
    assert after == before
    assert after[waiting["id"]]["status"] == "scheduled"
    assert (await bob.get(f"/api/v1/files/{bob_file['id']}")).json() == bob_file
    content = await bob.get(f"/api/v1/files/{bob_file['id']}/content")
    assert content.content == b"bob's secret bytes"


@pytest.mark.slow
async def test_ws_all_and_subscribe_show_only_own_jobs(tenants: Tenants, worker: WorkerRunner) -> None:
    alice, bob = tenants.alice, tenants.bob
    old = await submit(bob, params={"steps": 1})
    await wait_terminal(bob, old["id"])
    headers = {"Authorization": f"Bearer {tenants.keys['alice']}"}
    async with connect(tenants.ws("/api/v1/ws"), additional_headers=headers) as ws:
        await ws.send(json.dumps({"action": "subscribe", "job_ids": [old["id"]], "all": True}))
        assert await ws_json(ws) == {
            "type": "error", "status_code": 404, "detail": f"job {old['id']} not found", "job_id": old["id"],
        }  # fmt: skip
        assert await ws_json(ws) == {"type": "subscribed", "job_ids": [], "all": True}
        theirs = await submit(bob, params={"steps": 2, "duration_s": 0.2})
        mine = await submit(alice, params={"steps": 2, "duration_s": 0.2})
        await wait_terminal(bob, theirs["id"])
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not seen or seen[-1]["kind"] != "completed":
                seen.append(await ws_json(ws))
        with pytest.raises(TimeoutError):  # nothing more, and nothing of bob's
            seen.append(await ws_json(ws, timeout=0.3))
    assert {m["job_id"] for m in seen} == {mine["id"]}
    assert seen[0]["kind"] == "submitted"


# 3. admin routes ----------------------------------------------------------------------------


async def test_admin_routes_need_admin_key(tenants: Tenants, worker: WorkerRunner) -> None:
    alice, bob, root = tenants.alice, tenants.bob, tenants.root
    a = await submit(alice, params={"steps": 1})
    b = await submit(bob, params={"steps": 1})
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    held = await submit(bob, scheduled_for=later)
    await wait_terminal(alice, a["id"])
    await wait_terminal(bob, b["id"])
    routes = [
        ("GET", "/api/v1/jobs/admin/all"), ("GET", "/api/v1/jobs/admin/statistics"),
        ("GET", "/api/v1/jobs/admin/queue-status"), ("DELETE", "/api/v1/jobs/admin/cleanup?days_old=0"),
        ("POST", f"/api/v1/jobs/admin/{held['id']}/force-complete"),
    ]  # fmt: skip
    for http in (alice, bob):
        for method, path in routes:
            response = await http.request(method, path, json={} if method == "POST" else None)
            assert (response.status_code, response.json()) == (403, NOT_ADMIN), path
    assert (await bob.get(f"/api/v1/jobs/{held['id']}")).json()["status"] == "scheduled"
    assert (await bob.get(f"/api/v1/jobs/{b['id']}")).status_code == 200  # not cleaned up

    everyone = (await root.get("/api/v1/jobs/admin/all")).json()
    assert {(j["id"], j["owner"]) for j in everyone["items"]} == {
        (a["id"], "alice"), (b["id"], "bob"), (held["id"], "bob"),
    }  # fmt: skip
    only_bob = (await root.get("/api/v1/jobs/admin/all", params={"owner": "bob"})).json()
    assert {j["id"] for j in only_bob["items"]} == {b["id"], held["id"]}
    assert only_bob["total"] == 2
    statistics = await root.get("/api/v1/jobs/admin/statistics")
    assert statistics.status_code == 200
    assert statistics.json()["by_type"]["noop"]["counts"]["completed"] == 2  # both owners
    assert statistics.json()["by_type"]["noop"]["total"] == 3
    assert statistics.json()["totals"]["total"] == 3
    assert (await root.get("/api/v1/jobs/admin/queue-status")).status_code == 200
    forced = await root.post(
        f"/api/v1/jobs/admin/{held['id']}/force-complete", json={"result": {"by": "root"}}
    )
    assert forced.status_code == 200, forced.text
    assert (forced.json()["status"], forced.json()["result"], forced.json()["owner"]) == (
        "completed", {"by": "root"}, "bob",
    )  # fmt: skip
    cleanup = await root.delete("/api/v1/jobs/admin/cleanup", params={"days_old": 30})
    assert cleanup.status_code == 200
    assert cleanup.json()["deleted"] == 0


# 4. tokens and cookies ----------------------------------------------------------------------


async def test_token_for_sse_and_ws(tenants: Tenants, worker: WorkerRunner, settings: Settings) -> None:
    alice, anon = tenants.alice, tenants.anon
    job = await submit(alice, params={"steps": 2})
    issued = await alice.post("/api/v1/auth/token")
    assert issued.status_code == 200
    body = issued.json()
    token = body.pop("token")
    assert body == {"owner": "alice", "admin": False, "expires_in": 300}
    assert tenants.keys["alice"] not in token

    kinds: list[str] = []
    async with (
        asyncio.timeout(10),
        aconnect_sse(anon, "GET", f"/api/v1/jobs/{job['id']}/events", params={"token": token}) as source,
    ):
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            kinds.append(sse.event)
    assert kinds[0] == "submitted"
    assert kinds[-1] == "completed"
    frames, code = await ws_frames(tenants.ws(f"/api/v1/jobs/{job['id']}/ws?token={token}"))
    assert code == 1000
    assert [f["kind"] for f in frames] == kinds

    # the token stands for alice only
    bob_job = await submit(tenants.bob, params={"steps": 1})
    theirs = await anon.get(f"/api/v1/jobs/{bob_job['id']}", params={"token": token})
    assert theirs.json() == {"status_code": 404, "detail": f"job {bob_job['id']} not found"}

    payload, _, signature = token.partition(".")
    forged = sign_token(b"not the secret", Caller(owner="alice", admin=True), 300)
    alice = ApiKeyRecord(name="alice", sha256=key_hash(tenants.keys["alice"]))
    expired = sign_token(settings.session_key(), Caller(owner="alice", admin=False, key=alice), -5)
    for bad in (f"{payload}.{signature[:-1]}{'0' if signature[-1] != '0' else '1'}", f"{payload}x.{signature}",
                forged, expired, "garbage"):  # fmt: skip
        response = await anon.get(f"/api/v1/jobs/{job['id']}", params={"token": bad})
        assert (response.status_code, response.json()) == (401, BAD_TOKEN), bad
        with pytest.raises(InvalidStatus) as refused:
            async with connect(tenants.ws(f"/api/v1/jobs/{job['id']}/ws?token={bad}")):
                pass
        assert refused.value.response.status_code == 403  # a refused ASGI handshake


async def test_login_cookie_and_logout(tenants: Tenants) -> None:
    async with httpx.AsyncClient(base_url=tenants.api.url, timeout=10) as browser:
        bad = await browser.post("/api/v1/auth/login", json={"key": "wrong"})
        assert (bad.status_code, bad.json()) == (401, BAD_KEY)
        assert "set-cookie" not in bad.headers
        login = await browser.post("/api/v1/auth/login", json={"key": tenants.keys["alice"]})
        assert login.status_code == 200
        assert login.json() == {"owner": "alice", "admin": False, "token": None, "expires_in": 12 * 3600}
        cookie = login.headers["set-cookie"]
        assert cookie.startswith("jobcast_session=")
        assert "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert tenants.keys["alice"] not in cookie
        job = await submit(browser, params={"steps": 1})
        assert job["owner"] == "alice"
        listed = (await tenants.alice.get("/api/v1/jobs")).json()
        assert [j["id"] for j in listed["items"]] == [job["id"]]
        out = await browser.post("/api/v1/auth/logout")
        assert (out.status_code, out.json()) == (200, {"status": "logged out"})
        assert "jobcast_session" not in browser.cookies
        after = await browser.get("/api/v1/jobs")
        assert (after.status_code, after.json()) == (401, NEED_KEY)


# 5. no keys off loopback --------------------------------------------------------------------


async def test_refuses_public_bind_without_keys(
    nats_server: NatsServer, settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    public = replace(settings, host="0.0.0.0")
    config = uvicorn.Config(
        create_app(public), host="127.0.0.1", port=free_port(), lifespan="on", log_level="warning"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    async def serve() -> object:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a failed lifespan start-up
            return exc.code
        return None

    assert await asyncio.wait_for(serve(), 10) == 3
    assert not server.started
    assert "refusing to serve on 0.0.0.0 without API keys" in capfd.readouterr().err

    await put_key(nats_server.url, "ops", admin=True)
    api = ApiServer(public)
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url) as anon:
            response = await anon.get("/api/v1/jobs")
            assert (response.status_code, response.json()) == (401, NEED_KEY)
    finally:
        await api.stop()


# 6. webhook guard ---------------------------------------------------------------------------


async def test_webhook_to_loopback_refused_with_keys(tenants: Tenants, worker: WorkerRunner) -> None:
    async with Receiver([200]) as hook:
        job = await submit(tenants.alice, params={"steps": 1}, callback_url=hook.url)

        async def settled() -> dict[str, Any] | None:
            body: dict[str, Any] = (await tenants.alice.get(f"/api/v1/jobs/{job['id']}")).json()
            return body if body["callback_status"] not in (None, "pending") else None

        final = await wait_for(settled)
        await asyncio.sleep(0.1)
    assert final["callback_status"] == "failed"
    assert hook.requests == []


async def test_webhook_to_loopback_allowed_by_setting(
    nats_server: NatsServer, settings: Settings, worker: WorkerRunner
) -> None:
    key = await put_key(nats_server.url, "alice")
    server = ApiServer(replace(settings, webhook_allow_loopback=True))
    await server.start()
    try:
        async with (
            Receiver([200]) as hook,
            httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": key}) as alice,
        ):
            job = await submit(alice, params={"steps": 1}, callback_url=hook.url)

            async def settled() -> str | None:
                status: str | None = (await alice.get(f"/api/v1/jobs/{job['id']}")).json()["callback_status"]
                return status if status != "pending" else None

            assert await wait_for(settled) == "delivered"
        assert len(hook.requests) == 1
        assert json.loads(hook.requests[0][1])["id"] == job["id"]
    finally:
        await server.stop()


# the CLI ------------------------------------------------------------------------------------


async def jobcast(nats_url: str, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, JOBCAST_NATS_URL=nats_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobcast", "keys", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_create_list_revoke(tenants: Tenants, nats_server: NatsServer) -> None:
    code, out, err = await jobcast(nats_server.url, "create", "--name", "carol")
    assert code == 0, err
    key = out.strip()
    assert out == key + "\n"
    assert len(key) >= 20
    assert "shown this once" in err
    assert key not in err
    carol = {"Authorization": f"Bearer {key}"}

    async def works() -> bool:
        return (await tenants.anon.get("/api/v1/jobs", headers=carol)).status_code == 200

    await wait_for(works, timeout=2)
    code, out, err = await jobcast(nats_server.url, "list")
    assert code == 0, err
    lines = {line.split("\t")[0]: line.split("\t")[1] for line in out.splitlines()}
    assert lines == {"alice": "user", "bob": "user", "root": "admin", "carol": "user"}
    assert key not in out
    assert all(k not in out for k in tenants.keys.values())
    again = await jobcast(nats_server.url, "create", "--name", "carol")
    assert again[0] == 1
    assert again[1] == ""

    code, out, err = await jobcast(nats_server.url, "revoke", "carol")
    assert (code, out) == (0, "key 'carol' revoked\n"), err

    async def revoked() -> bool:
        response = await tenants.anon.get("/api/v1/jobs", headers=carol)
        return response.status_code == 401 and response.json() == BAD_KEY

    await wait_for(revoked, timeout=1)
    assert (await jobcast(nats_server.url, "revoke", "carol"))[0] == 1
