"""Limits: requests per key per minute, open streams per key, WebSocket message size."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect as ws_connect

from app import Settings
from app._ratelimit import WINDOW_S, RateLimit
from streams import NatsServer
from tests.conftest import ApiServer, submit
from tests.test_security import put_key


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[ApiServer]:
    """An API with tiny limits."""
    server = ApiServer(replace(settings, rate_limit_per_minute=8, max_streams_per_owner=1))
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def serving(settings: Settings, keys: dict[str, str]) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """An API with `settings`, and a client per key name, each sending its key."""
    server = ApiServer(settings)
    await server.start()
    clients = {
        name: httpx.AsyncClient(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {key}"})
        for name, key in keys.items()
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.aclose()
        await server.stop()


async def test_rate_limit_per_key(limited: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=limited.url) as client:
        answers = [await client.get("/api/v1/jobs") for _ in range(10)]
        codes = [a.status_code for a in answers]
        assert codes[:8] == [200] * 8
        assert codes[8:] == [429, 429]
        assert answers[-1].json()["status_code"] == 429
        assert "RateLimit-Reset" in answers[-1].headers or "ratelimit-reset" in answers[-1].headers
        health = await client.get("/health")  # probes are never limited
        assert health.json()["status"] == "ok"


@pytest.mark.slow
async def test_one_open_stream_per_key(limited: ApiServer) -> None:
    ws_base = limited.url.replace("http", "ws")
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as client:
        job = await submit(client)  # no worker: it stays pending, so its stream stays open
        async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job['id']}/events") as first:
            events = first.aiter_sse()
            assert (await anext(events)).event == "submitted"
            second = await client.get(f"/api/v1/jobs/{job['id']}/events")
            assert second.status_code == 429
            assert "too many open streams" in second.json()["detail"]
            poll = await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 1})
            assert poll.status_code == 429
            async with ws_connect(f"{ws_base}/api/v1/jobs/{job['id']}/ws") as socket:
                refusal = json.loads(await socket.recv())
                assert refusal["status_code"] == 429
                await asyncio.wait_for(socket.wait_closed(), 5)
                assert socket.close_code == 4429
        # the first stream is closed: once the server has seen it go, a new one may open
        await limited.idle()
        again = await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 1})
        assert again.status_code == 200
        assert again.json()["id"] == job["id"]


async def test_websocket_message_size(api: ApiServer) -> None:
    async with ws_connect(f"{api.url.replace('http', 'ws')}/api/v1/ws") as socket:
        await socket.send(json.dumps({"action": "subscribe", "job_ids": ["x" * 20_000]}))
        answer = json.loads(await socket.recv())
        assert answer == {
            "type": "error",
            "status_code": 413,
            "detail": "messages are limited to 16384 bytes",
        }
        await socket.send(json.dumps({"action": "subscribe", "all": True}))
        assert json.loads(await socket.recv()) == {"type": "subscribed", "job_ids": [], "all": True}


async def test_json_bodies_are_small_uploads_may_be_large(settings: Settings) -> None:
    server = ApiServer(replace(settings, max_request_bytes=2000, max_upload_bytes=100_000))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            big = await client.post("/api/v1/jobs", json={"type": "noop", "title": "x" * 5000})
            assert big.status_code == 413
            assert big.json()["status_code"] == 413
            upload = await client.post("/api/v1/files", files={"file": ("a.bin", b"\0" * 50_000)})
            assert upload.status_code == 201, upload.text
            assert upload.json()["size"] == 50_000
            too_big = await client.post("/api/v1/files", files={"file": ("b.bin", b"\0" * 200_000)})
            assert too_big.status_code == 413
    finally:
        await server.stop()


@pytest.mark.slow
async def test_each_admin_key_has_its_own_stream_quota(settings: Settings, nats_server: NatsServer) -> None:
    """An admin following another owner's job counts in its own key's quota, not in one shared by
    every admin key (or by everyone following across owners)."""
    keys = {
        name: await put_key(nats_server.url, name, admin=name != "bob") for name in ("root1", "root2", "bob")
    }
    async with serving(replace(settings, max_streams_per_owner=1), keys) as clients:
        bobs = await submit(clients["bob"])  # no worker: it stays pending, so its stream stays open
        own = await submit(clients["root2"])
        async with aconnect_sse(clients["root1"], "GET", f"/api/v1/jobs/{bobs['id']}/events") as held:
            events = held.aiter_sse()  # kept: a collected generator would close the stream
            assert (await anext(events)).event == "submitted"
            poll = await clients["root2"].get(f"/api/v1/jobs/{own['id']}/poll", params={"timeout": 1})
            assert (poll.status_code, poll.json()["id"]) == (200, own["id"])
            across = await clients["root2"].get(f"/api/v1/jobs/{bobs['id']}/poll", params={"timeout": 1})
            assert (across.status_code, across.json()["owner"]) == (200, "bob")
            second = await clients["root1"].get(f"/api/v1/jobs/{own['id']}/poll", params={"timeout": 1})
            assert second.status_code == 429
            assert "too many open streams" in second.json()["detail"]


async def test_rate_limit_counts_each_key_in_its_own_window(
    settings: Settings, nats_server: NatsServer
) -> None:
    """alice's full window leaves bob's alone; the RateLimit-* headers count down to the 429."""
    keys = {name: await put_key(nats_server.url, name) for name in ("alice", "bob")}
    async with serving(replace(settings, rate_limit_per_minute=3), keys) as clients:
        answers = [await clients["alice"].get("/api/v1/jobs") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        assert {a.headers["ratelimit-limit"] for a in answers} == {"3"}
        assert {a.headers["ratelimit-policy"] for a in answers} == {"3; w=60"}
        assert all(0 < int(a.headers["ratelimit-reset"]) <= 60 for a in answers)
        assert answers[-1].json() == {"status_code": 429, "detail": "Too Many Requests"}
        bobs = await clients["bob"].get("/api/v1/jobs")
        assert (bobs.status_code, bobs.headers["ratelimit-remaining"]) == (200, "2")
        assert bobs.json()["items"] == []
        health = await clients["alice"].get("/health")  # excluded: not counted, no headers
        assert (health.json()["status"], "ratelimit-limit" in health.headers) == ("ok", False)


def test_rate_limit_keeps_only_the_current_windows() -> None:
    """A window is two integers per caller, and windows that ended are dropped: memory is bounded by
    the callers of the last minute, not by the requests."""
    limit = RateLimit(5)
    now = 1_000_000
    for n in range(1000):
        limit.count(f"addr:10.0.{n // 256}.{n % 256}", now)
    assert limit.count("owner:alice", now) == (1, now + WINDOW_S)
    for _ in range(10):
        counted = limit.count("owner:alice", now + 1)
    assert counted == (6, now + WINDOW_S)  # refused past the limit, not counted further
    assert limit.windows == 1001
    assert limit.count("owner:alice", now + WINDOW_S) == (1, now + 2 * WINDOW_S)
    assert limit.windows == 1  # the ended windows were swept
