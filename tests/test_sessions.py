"""Session tokens: their own secret, tied to the key they came from; local mode; the admin key from env."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app import Settings
from app._auth import SESSION_MAX_AGE_S, Caller, sign_token
from streams import ApiKeyRecord, NatsServer, admin_key_from_env, close_quietly, key_hash, keys_bucket
from streams import connect as nats_connect
from tests.conftest import MEDIA, ApiServer, WorkerRunner, free_port, spawned, submit
from tests.test_admin import Receiver, wait_for
from tests.test_security import BAD_KEY, BAD_TOKEN, NEED_KEY, put_key

ADMIN_ALL = "/api/v1/jobs/admin/all"
JFK = MEDIA / "jfk.flac"


async def revoke(nats_url: str, name: str) -> None:
    """Delete a key from the bucket, as `jobcast keys revoke` does."""
    nc = await nats_connect(nats_url, "t")
    try:
        await (await keys_bucket(nc.jetstream())).delete(name)
    finally:
        await close_quietly(nc)


async def stored_record(nats_url: str, name: str) -> tuple[ApiKeyRecord, int]:
    """A key's record in the bucket and its revision."""
    nc = await nats_connect(nats_url, "t")
    try:
        entry = await (await keys_bucket(nc.jetstream())).get(name)
        assert entry.value is not None
        assert entry.revision is not None
        return msgspec.json.decode(entry.value, type=ApiKeyRecord), entry.revision
    finally:
        await close_quietly(nc)


def session(cookie: str) -> dict[str, str]:
    """The header a browser holding this session cookie sends."""
    return {"Cookie": f"jobcast_session={cookie}"}


def hand_signed(secret: bytes, claims: dict[str, Any]) -> str:
    """A token built by hand, the way a party holding `secret` could build one."""
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
    return payload + "." + hmac.new(secret, b"token:" + payload.encode(), hashlib.sha256).hexdigest()


class Api:
    """One API with keys for alice (user) and root (admin)."""

    def __init__(self, server: ApiServer, keys: dict[str, str]) -> None:
        self.server = server
        self.keys = keys
        self.anon = httpx.AsyncClient(base_url=server.url, timeout=30)

    def as_key(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def ws(self, path: str) -> str:
        return self.server.url.replace("http://", "ws://") + path

    async def token(self, headers: dict[str, str] | None = None, **params: str) -> dict[str, Any]:
        issued = await self.anon.post("/api/v1/auth/token", headers=headers, params=params)
        assert issued.status_code == 200, issued.text
        body: dict[str, Any] = issued.json()
        return body

    async def login_cookie(self, name: str) -> str:
        login = await self.anon.post("/api/v1/auth/login", json={"key": self.keys[name]})
        assert login.status_code == 200, login.text
        self.anon.cookies.clear()
        return str(login.cookies["jobcast_session"])


@pytest.fixture
async def keyed(nats_server: NatsServer, settings: Settings) -> AsyncIterator[Api]:
    keys = {
        "alice": await put_key(nats_server.url, "alice"),
        "root": await put_key(nats_server.url, "root", True),
    }
    server = ApiServer(replace(settings, session_secret="session-secret-for-tests"))
    await server.start()
    api = Api(server, keys)
    try:
        yield api
    finally:
        await api.anon.aclose()
        await server.stop()


# 1. a secret of their own ------------------------------------------------------------------------


async def test_webhook_secret_cannot_mint_tokens(keyed: Api, settings: Settings) -> None:
    webhook_key = settings.signing_key()
    later = int(time.time() + 300)
    forgeries = [
        hand_signed(webhook_key, {"o": "mallory", "a": True, "e": later}),  # the format of the old tokens
        hand_signed(
            webhook_key, {"o": "root", "a": True, "k": "root", "i": "0" * 16, "l": time.time(), "e": later}
        ),
        sign_token(webhook_key, Caller(owner="mallory", admin=True), 300),
    ]
    for forged in forgeries:
        response = await keyed.anon.get(ADMIN_ALL, params={"token": forged})
        assert (response.status_code, response.json()) == (401, BAD_TOKEN), forged
        response = await keyed.anon.get(ADMIN_ALL, headers=session(forged))
        assert (response.status_code, response.json()) == (401, BAD_TOKEN), forged
    # the real admin key's token opens the route (so the 401s above are the signature, not the route)
    token = (await keyed.token(keyed.as_key("root")))["token"]
    everyone = await keyed.anon.get(ADMIN_ALL, params={"token": token})
    assert everyone.status_code == 200
    assert everyone.json()["items"] == []


async def test_malformed_tokens_are_401_not_500(keyed: Api) -> None:
    for bad in ("t\u00f8ken.s\u00efg", "\u00e9", ".", "a.b.c", "x" * 4000, "eyJ9.0"):
        response = await keyed.anon.get("/api/v1/jobs", params={"token": bad})
        assert (response.status_code, response.json()) == (401, BAD_TOKEN), bad


async def test_session_secret_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh", session_secret="", webhook_secret="")
    with ThreadPoolExecutor(8) as pool:  # eight API processes starting at once agree on one secret
        secrets_read = set(pool.map(lambda _: settings.session_key(), range(8)))
    assert len(secrets_read) == 1
    secret = secrets_read.pop()
    assert len(secret) == 64
    path = tmp_path / "fresh" / "session-secret"
    assert path.read_bytes().strip() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert settings.signing_key() != secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["session-secret", "webhook-secret"]
    assert Settings(data_dir=tmp_path / "fresh", session_secret="from-env").session_key() == b"from-env"


async def test_rotating_the_webhook_secret_keeps_sessions(
    nats_server: NatsServer, settings: Settings, worker: WorkerRunner
) -> None:
    key = await put_key(nats_server.url, "alice")
    first = ApiServer(replace(settings, webhook_secret="webhook-one", webhook_allow_loopback=True))
    await first.start()
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            cookie = (await http.post("/api/v1/auth/login", json={"key": key})).cookies["jobcast_session"]
            token = (await http.post("/api/v1/auth/token", headers={"X-API-Key": key})).json()["token"]
    finally:
        await first.stop()
    second = ApiServer(replace(settings, webhook_secret="webhook-two", webhook_allow_loopback=True))
    await second.start()
    try:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            mine = await http.get("/api/v1/jobs", params={"token": token})
            assert (mine.status_code, mine.json()["total"]) == (200, 0)
            http.headers.update(session(cookie))
            async with Receiver([200]) as hook:
                job = await submit(http, params={"steps": 1}, callback_url=hook.url)
                assert job["owner"] == "alice"
                await wait_for(lambda: _delivered(http, job["id"]))
            headers, body = hook.requests[0]
            assert (
                headers["x-jobcast-signature"]
                == "sha256=" + hmac.new(b"webhook-two", body, "sha256").hexdigest()
            )
    finally:
        await second.stop()


async def _delivered(http: httpx.AsyncClient, job_id: str) -> bool:
    return bool((await http.get(f"/api/v1/jobs/{job_id}")).json()["callback_status"] == "delivered")


async def test_rotating_the_session_secret_keeps_webhook_signatures(
    nats_server: NatsServer, settings: Settings, worker: WorkerRunner
) -> None:
    key = await put_key(nats_server.url, "alice")
    tokens: list[str] = []
    async with Receiver([200]) as hook:
        for session_secret in ("session-one", "session-two"):
            server = ApiServer(replace(settings, session_secret=session_secret, webhook_allow_loopback=True))
            await server.start()
            try:
                async with (
                    httpx.AsyncClient(base_url=server.url, timeout=30, headers={"X-API-Key": key}) as alice,
                    httpx.AsyncClient(base_url=server.url, timeout=30) as anon,
                ):
                    for old in tokens:  # a token of the old session secret is over
                        stale = await anon.get("/api/v1/jobs", params={"token": old})
                        assert (stale.status_code, stale.json()) == (401, BAD_TOKEN)
                    tokens.append((await alice.post("/api/v1/auth/token")).json()["token"])
                    job = await submit(alice, params={"steps": 1}, callback_url=hook.url)
                    await wait_for(lambda: _delivered(alice, job["id"]))  # noqa: B023 - awaited here
            finally:
                await server.stop()
    webhook_key = settings.signing_key()  # generated into the data dir, as both servers read it
    assert len(hook.requests) == 2
    for headers, body in hook.requests:
        assert headers["x-jobcast-signature"] == "sha256=" + hmac.new(webhook_key, body, "sha256").hexdigest()


# 1. a token names its key ------------------------------------------------------------------------


async def test_revoking_a_key_ends_its_sessions_links_and_streams(
    keyed: Api, nats_server: NatsServer
) -> None:
    alice = keyed.as_key("alice")
    async with httpx.AsyncClient(base_url=keyed.server.url, headers=alice) as http:
        job = await submit(http, params={"steps": 1})
    cookie = await keyed.login_cookie("alice")
    token = (await keyed.token(alice))["token"]
    refreshed = (await keyed.token(token=token))["token"]
    for params, headers in (({"token": token}, {}), ({"token": refreshed}, {}), ({}, session(cookie))):
        ok = await keyed.anon.get(f"/api/v1/jobs/{job['id']}", params=params, headers=headers)
        assert (ok.status_code, ok.json()["owner"]) == (200, "alice")
    for credential in (token, refreshed):  # the tokens open the job's event stream
        async with aconnect_sse(
            keyed.anon, "GET", f"/api/v1/jobs/{job['id']}/events", params={"token": credential}
        ) as source:
            assert source.response.status_code == 200
            assert (await anext(source.aiter_sse())).event == "submitted"

    await revoke(nats_server.url, "alice")
    since = time.monotonic()

    async def cookie_refused() -> bool:
        response = await keyed.anon.get("/api/v1/jobs", headers=session(cookie))
        return response.status_code == 401

    await wait_for(cookie_refused, timeout=5)
    assert time.monotonic() - since < 5
    for credential in (token, refreshed):
        response = await keyed.anon.get(f"/api/v1/jobs/{job['id']}", params={"token": credential})
        assert (response.status_code, response.json()) == (401, BAD_TOKEN)
        again = await keyed.anon.post("/api/v1/auth/token", params={"token": credential})
        assert (again.status_code, again.json()) == (401, BAD_TOKEN)  # no refresh past the key's life
        async with aconnect_sse(
            keyed.anon, "GET", f"/api/v1/jobs/{job['id']}/events", params={"token": credential}
        ) as source:
            assert source.response.status_code == 401
        with pytest.raises(InvalidStatus) as refused:
            async with connect(keyed.ws(f"/api/v1/jobs/{job['id']}/ws?token={credential}")):
                pass
        assert refused.value.response.status_code == 403  # a refused ASGI handshake
    cookie_only = await keyed.anon.get("/api/v1/jobs", headers=session(cookie))
    assert (cookie_only.status_code, cookie_only.json()) == (401, BAD_TOKEN)

    # the same name, a new key: the old sessions stay dead, the new key's work
    keyed.keys["alice"] = await put_key(nats_server.url, "alice")

    async def new_key_works() -> bool:
        return (await keyed.anon.get("/api/v1/jobs", headers=keyed.as_key("alice"))).status_code == 200

    await wait_for(new_key_works, timeout=5)
    for credential in (token, refreshed):
        response = await keyed.anon.get("/api/v1/jobs", params={"token": credential})
        assert (response.status_code, response.json()) == (401, BAD_TOKEN)
    response = await keyed.anon.get("/api/v1/jobs", headers=session(cookie))
    assert (response.status_code, response.json()) == (401, BAD_TOKEN)
    fresh = await keyed.login_cookie("alice")
    listed = await keyed.anon.get(f"/api/v1/jobs/{job['id']}", headers=session(fresh))
    assert (listed.status_code, listed.json()["owner"]) == (200, "alice")


async def test_token_refresh_cannot_outlive_the_login(keyed: Api) -> None:
    secret = b"session-secret-for-tests"
    alice = ApiKeyRecord(name="alice", sha256=key_hash(keyed.keys["alice"]))
    now = time.time()
    # a session that began almost SESSION_MAX_AGE_S ago: a refresh gets only what is left of it
    late = sign_token(
        secret, Caller(owner="alice", admin=False, key=alice, login_at=now - SESSION_MAX_AGE_S + 60), 300
    )
    body = await keyed.token(token=late)
    assert body["owner"] == "alice"
    assert 50 <= body["expires_in"] <= 60
    chained = await keyed.token(token=body["token"])
    assert 50 <= chained["expires_in"] <= 60  # the refreshed token carries the original login time
    by_cookie = await keyed.anon.post("/api/v1/auth/token", headers=session(late))
    assert by_cookie.status_code == 200
    assert 50 <= by_cookie.json()["expires_in"] <= 60

    # past the maximum age, even a token still within its own expiry is over
    over = sign_token(
        secret, Caller(owner="alice", admin=False, key=alice, login_at=now - SESSION_MAX_AGE_S - 1), 300
    )
    for params, headers in (({"token": over}, {}), ({}, session(over))):
        response = await keyed.anon.post("/api/v1/auth/token", params=params, headers=headers)
        assert (response.status_code, response.json()) == (401, BAD_TOKEN)

    # a key presented itself starts a fresh login: the full five minutes
    assert (await keyed.token(keyed.as_key("alice")))["expires_in"] == 300


# 1. + 4. local mode --------------------------------------------------------------------------------


async def test_local_mode_tokens_stop_once_a_key_exists(api: ApiServer, nats_server: NatsServer) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as anon:
        issued = await anon.post("/api/v1/auth/token")
        assert issued.status_code == 200
        token = issued.json().pop("token")
        assert issued.json() == {"owner": "local", "admin": True, "token": token, "expires_in": 300}
        ok = await anon.get(ADMIN_ALL, params={"token": token})
        assert (ok.status_code, ok.json()["total"]) == (200, 0)

        await put_key(nats_server.url, "ops", admin=True)

        async def key_seen() -> bool:
            return (await anon.get("/api/v1/jobs")).status_code == 401

        await wait_for(key_seen, timeout=5)
        for path in (ADMIN_ALL, "/api/v1/jobs"):
            response = await anon.get(path, params={"token": token})
            assert (response.status_code, response.json()) == (401, BAD_TOKEN), path
        refresh = await anon.post("/api/v1/auth/token", params={"token": token})
        assert (refresh.status_code, refresh.json()) == (401, BAD_TOKEN)
        plain = await anon.get("/api/v1/jobs")
        assert (plain.status_code, plain.json()) == (401, NEED_KEY)


async def test_local_mode_serves_the_openai_sdk_with_any_key(
    api: ApiServer, nats_server: NatsServer, gpu: WorkerRunner
) -> None:
    sdk = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0, timeout=60)
    try:
        with JFK.open("rb") as audio:
            answer = await sdk.audio.transcriptions.create(model="whisper-1", file=audio)
        assert "ask not what your country can do for you" in answer.text.lower()
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as anon:
            jobs = (await anon.get("/api/v1/jobs", params={"type": "transcribe"})).json()["items"]
            assert [(j["owner"], j["status"]) for j in jobs] == [("local", "completed")]
            # an unknown key grants what no key grants, nothing more
            with_key = await anon.post("/api/v1/auth/token", headers={"Authorization": "Bearer x"})
            without = await anon.post("/api/v1/auth/token")
            assert {**with_key.json(), "token": None} == {**without.json(), "token": None}
            assert with_key.json()["owner"] == "local"
            x_api_key = await anon.get("/api/v1/jobs", headers={"X-API-Key": "sk-anything"})
            assert [j["id"] for j in x_api_key.json()["items"]] == [jobs[0]["id"]]

            await put_key(nats_server.url, "alice")

            async def key_seen() -> bool:
                return (
                    await anon.get("/api/v1/jobs", headers={"Authorization": "Bearer x"})
                ).status_code == 401

            await wait_for(key_seen, timeout=5)
            refused = await anon.get("/api/v1/jobs", headers={"Authorization": "Bearer x"})
            assert refused.json() == BAD_KEY
        with pytest.raises(openai.AuthenticationError) as denied, JFK.open("rb") as audio:
            await sdk.audio.transcriptions.create(model="whisper-1", file=audio)
        assert denied.value.status_code == 401
        assert denied.value.body == {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                                     "code": None}  # fmt: skip
    finally:
        await sdk.close()


# 5. the admin key from the environment -------------------------------------------------------------


def test_admin_key_from_env_value_or_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "admin-key"
    secret_file.write_text("from-a-file\n")
    assert admin_key_from_env({}) is None
    assert admin_key_from_env({"JOBCAST_ADMIN_KEY": ""}) is None
    assert admin_key_from_env({"JOBCAST_ADMIN_KEY": " value \n"}) == "value"
    assert admin_key_from_env({"JOBCAST_ADMIN_KEY_FILE": str(secret_file)}) == "from-a-file"
    both = {"JOBCAST_ADMIN_KEY": "value", "JOBCAST_ADMIN_KEY_FILE": str(secret_file)}
    assert admin_key_from_env(both) == "value"
    with pytest.raises(ValueError, match="JOBCAST_ADMIN_KEY_FILE"):
        admin_key_from_env({"JOBCAST_ADMIN_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        admin_key_from_env({"JOBCAST_ADMIN_KEY_FILE": str(tmp_path / "empty")})


async def test_admin_key_from_env_lets_a_fresh_api_bind_publicly(
    nats_server: NatsServer, settings: Settings
) -> None:
    public = replace(settings, host="0.0.0.0", admin_key="first-admin-key")
    two = [ApiServer(public), ApiServer(replace(public, data_dir=settings.data_dir.with_name("other")))]
    await asyncio.gather(*(server.start() for server in two))  # two APIs starting at once
    try:
        record, revision = await stored_record(nats_server.url, "admin")
        assert (record.name, record.admin, record.sha256) == ("admin", True, key_hash("first-admin-key"))
        for server in two:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                anon = await http.get(ADMIN_ALL)
                assert (anon.status_code, anon.json()) == (401, NEED_KEY)
                admin = await http.get(ADMIN_ALL, headers={"Authorization": "Bearer first-admin-key"})
                assert (admin.status_code, admin.json()["total"]) == (200, 0)
    finally:
        await asyncio.gather(*(server.stop() for server in two))
    again = ApiServer(public)  # a restart with the same key writes nothing
    await again.start()
    await again.stop()
    assert await stored_record(nats_server.url, "admin") == (record, revision)

    changed = ApiServer(replace(public, admin_key="second-admin-key"))  # the stored key follows the env
    await changed.start()
    try:
        async with httpx.AsyncClient(base_url=changed.url, timeout=30) as http:
            old = await http.get(ADMIN_ALL, headers={"Authorization": "Bearer first-admin-key"})
            assert (old.status_code, old.json()) == (401, BAD_KEY)
            new = await http.get(ADMIN_ALL, headers={"Authorization": "Bearer second-admin-key"})
            assert new.status_code == 200
            assert new.json()["items"] == []
    finally:
        await changed.stop()
    assert (await stored_record(nats_server.url, "admin"))[0].sha256 == key_hash("second-admin-key")


async def wait_ready(proc: asyncio.subprocess.Process, http: httpx.AsyncClient) -> None:
    """Poll the API process `proc` serves at `http` until /ready answers 200 (at most 30 s)."""

    async def ready() -> bool:
        assert proc.returncode is None, "the API exited"
        try:
            return (await http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout=30)


async def check_public_api(args: list[str], port: int, env: dict[str, str], admin_key: str) -> None:
    """Run `jobcast ARGS` (an API on a public address); it must serve the admin key and refuse anyone else."""
    argv = [sys.executable, "-m", "jobcast", *args]
    async with spawned(argv, env) as proc, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        await wait_ready(proc, http)
        admin = await http.get(ADMIN_ALL, headers={"X-API-Key": admin_key})
        assert (admin.status_code, admin.json()["total"]) == (200, 0)
        anon = await http.get(ADMIN_ALL)
        assert (anon.status_code, anon.json()) == (401, NEED_KEY)


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any JOBCAST_ setting, plus `overrides`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("JOBCAST_")}
    return {**env, **overrides}


async def test_jobcast_api_reads_the_admin_key_file(nats_server: NatsServer, tmp_path: Path) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("key-from-a-docker-secret\n")
    port = free_port()
    env = clean_env(JOBCAST_NATS_URL=nats_server.url, JOBCAST_DATA_DIR=str(tmp_path / "data"),
                    JOBCAST_ADMIN_KEY_FILE=str(key_file))  # fmt: skip
    await check_public_api(
        ["api", "--host", "0.0.0.0", "--port", str(port)], port, env, "key-from-a-docker-secret"
    )
