"""Following jobs live: SSE (history, resume, keep-alive), WebSockets and long-poll."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app._hub import Applied, Hub, sse_frame
from app._sse import SseFanout, SseFollower
from tests.conftest import TERMINAL, ApiServer, WorkerRunner, submit, wait_terminal

ENVELOPE_KEYS = {
    "seq",
    "job_id",
    "kind",
    "status",
    "progress",
    "current_step",
    "attempt",
    "ts",
    "event",
    "eta_s",
}


async def read_sse(
    client: httpx.AsyncClient,
    job_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    limit: int | None = None,
) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of the SSE messages until the server ends the stream, or the first `limit`."""
    seen: list[tuple[int, str, dict[str, Any]]] = []
    async with asyncio.timeout(20):
        async with aconnect_sse(
            client, "GET", f"/api/v1/jobs/{job_id}/events", headers=dict(headers or {}), params=params
        ) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # a keep-alive comment: httpx-sse yields it as an empty event
                seen.append((int(sse.id), sse.event, json.loads(sse.data)))
                if limit is not None and len(seen) >= limit:
                    break
    return seen


def check_envelopes(messages: list[tuple[int, str, dict[str, Any]]], job_id: str) -> None:
    """Every message is a well-formed envelope whose id and event match it; ids strictly increase."""
    for seq, kind, data in messages:
        assert set(data) == ENVELOPE_KEYS
        assert data["seq"] == seq
        assert data["kind"] == kind
        assert data["job_id"] == job_id
        assert data["event"]["kind"] == kind
        assert data["event"]["job_id"] == job_id
        assert data["attempt"] == 1
    ids = [seq for seq, _, _ in messages]
    assert ids == sorted(set(ids)), ids


async def ws_json(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    """The next text frame, decoded."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str)
    message: dict[str, Any] = json.loads(raw)
    return message


def ws_url(api: ApiServer, path: str) -> str:
    return api.url.replace("http://", "ws://") + path


# SSE -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_sse_streams_history_then_live_and_ends(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 5, "duration_s": 1.5})
    messages = await read_sse(client, job["id"])

    check_envelopes(messages, job["id"])
    kinds = [kind for _, kind, _ in messages]
    assert kinds[0] == "submitted"
    assert kinds[1] == "started"
    assert kinds[-1] == "completed"
    assert set(kinds[2:-1]) == {"progress"}
    assert kinds.count("completed") == 1

    first = messages[0][2]
    assert first["status"] == "pending"
    assert first["event"]["type"] == "noop"
    assert first["event"]["params"]["steps"] == 5
    assert messages[1][2]["status"] == "running"
    assert messages[1][2]["event"]["worker"] == "test-worker"

    partial = [
        data["progress"] for _, kind, data in messages if kind == "progress" and 0 < data["progress"] < 100
    ]
    assert partial, messages
    assert partial == sorted(partial)
    for _, kind, data in messages:
        if kind == "progress":
            assert data["status"] == "running"
            assert data["event"]["progress"] == data["progress"]
            assert data["current_step"] == data["event"]["step"]
            assert data["current_step"].startswith("step ")

    last = messages[-1][2]
    assert last["status"] == "completed"
    assert last["progress"] == 100.0
    assert last["event"]["result"] == {"steps": 5, "duration_s": 1.5, "delivery": 1}

    final = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert final["status"] == "completed"
    assert final["last_event_id"] == messages[-1][0]


async def test_sse_on_finished_job_replays_history_and_ends(
    client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 2})
    done = await wait_terminal(client, job["id"])
    assert done["status"] == "completed"

    started = time.monotonic()
    first = await read_sse(client, job["id"])
    second = await read_sse(client, job["id"])
    assert time.monotonic() - started < 2  # no waiting for live events that never come

    assert first == second
    check_envelopes(first, job["id"])
    assert first[0][1] == "submitted"
    assert first[-1][1] == "completed"
    assert first[-1][0] == done["last_event_id"]


async def test_sse_replays_a_short_history_while_every_pooled_connection_is_taken(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    """Thousands of followers connecting at once each waited for one of the async pool's
    connections to read the history; past the pool's 30 s wait their streams failed (P3, 10k
    clients each on its own job). A follower's first, short page needs no pooled connection."""
    job = await submit(client, params={"steps": 2})
    done = await wait_terminal(client, job["id"])
    assert api.app is not None
    engine = api.app.state.queries.db.engine
    held = []
    try:
        while True:  # take every connection the pool will give, overflow included
            try:
                held.append(await asyncio.wait_for(engine.connect(), 0.5))
            except TimeoutError:
                break
        assert len(held) >= 5

        async with asyncio.timeout(5):
            messages = await read_sse(client, job["id"])
    finally:
        for conn in held:
            await conn.close()
    check_envelopes(messages, job["id"])
    assert messages[0][1] == "submitted"
    assert messages[-1][1] == "completed"
    assert messages[-1][0] == done["last_event_id"]


async def test_sse_failed_job_ends_after_failed(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1, "fail": True, "error": "boom"})
    messages = await read_sse(client, job["id"])
    check_envelopes(messages, job["id"])
    assert messages[-1][1] == "failed"
    assert messages[-1][2]["status"] == "failed"
    assert messages[-1][2]["event"]["error"] == "boom"
    assert [kind for _, kind, _ in messages].count("failed") == 1


@pytest.mark.slow
async def test_sse_resume_with_last_event_id(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 8, "duration_s": 2})
    head = await read_sse(client, job["id"], limit=3)  # submitted, started, first progress
    assert [kind for _, kind, _ in head][:2] == ["submitted", "started"]
    assert head[-1][2]["status"] == "running"
    still = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert still["status"] == "running"  # the disconnect happened in the middle

    tail = await read_sse(client, job["id"], headers={"Last-Event-ID": str(head[-1][0])})
    assert tail, "nothing after the resume point"
    assert tail[0][0] > head[-1][0]
    assert tail[-1][1] == "completed"

    full = await read_sse(client, job["id"])
    assert head + tail == full
    check_envelopes(full, job["id"])

    # resuming at the end gives nothing and ends at once
    assert await read_sse(client, job["id"], headers={"Last-Event-ID": str(full[-1][0])}) == []


@pytest.mark.slow
async def test_sse_resume_with_after_query(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 8, "duration_s": 2})
    head = await read_sse(client, job["id"], limit=3)
    tail = await read_sse(client, job["id"], params={"after": head[-1][0]})
    assert tail[0][0] > head[-1][0]
    assert tail[-1][1] == "completed"

    full = await read_sse(client, job["id"])
    assert head + tail == full
    # after=N and Last-Event-ID: N give the same replay
    middle = full[len(full) // 2][0]
    by_query = await read_sse(client, job["id"], params={"after": middle})
    by_header = await read_sse(client, job["id"], headers={"Last-Event-ID": str(middle)})
    assert by_query == by_header == [m for m in full if m[0] > middle]


@pytest.mark.slow
async def test_sse_sends_keepalive_pings(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1, "duration_s": 2})
    lines: list[str] = []
    async with asyncio.timeout(15):
        async with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-cache"
            async for line in response.aiter_lines():
                lines.append(line)
    pings = [line for line in lines if line.startswith(":")]
    assert pings, lines
    assert all(line.strip() == ": ping" for line in pings), pings
    assert len(pings) >= 2  # ~2 s of idling at sse_ping_s=0.5
    assert "event: completed" in lines
    # the last event is the end: nothing but blank lines after its data
    end = lines.index("event: completed")
    assert not [line for line in lines[end:] if line.startswith(":")]


async def test_sse_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    job_id = str(uuid.uuid4())
    response = await client.get(f"/api/v1/jobs/{job_id}/events")
    assert response.status_code == 404
    assert response.json() == {"status_code": 404, "detail": f"job {job_id} not found"}


async def test_sse_invalid_last_event_id_is_400(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1})
    for value, message in (("abc", "Expected `int | null`, got `str`"), ("-1", "Expected `int` >= 0")):
        response = await client.get(f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": value})
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["status_code"] == 400
        assert body["detail"].startswith("Validation failed for GET")
        assert body["extra"] == [{"message": message, "key": "last_event_id", "source": "header"}]
    response = await client.get(f"/api/v1/jobs/{job['id']}/events", params={"after": "x"})
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "after"


# WebSocket per job -----------------------------------------------------------------------


async def ws_collect(url: str) -> tuple[list[dict[str, Any]], int | None]:
    """Envelopes until the server closes, and the close code."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(20), connect(url) as ws:
        try:
            while True:
                messages.append(await ws_json(ws))
        except ConnectionClosed:
            pass
        code = ws.close_code
    return messages, code


@pytest.mark.slow
async def test_ws_job_streams_and_closes(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 5, "duration_s": 1})
    messages, code = await ws_collect(ws_url(api, f"/api/v1/jobs/{job['id']}/ws"))
    assert code == 1000
    kinds = [m["kind"] for m in messages]
    assert kinds[0] == "submitted"
    assert kinds[-1] == "completed"
    assert kinds.count("completed") == 1
    for m in messages:
        assert set(m) == ENVELOPE_KEYS
        assert m["job_id"] == job["id"]
        assert m["event"]["kind"] == m["kind"]
    assert messages[-1]["event"]["result"] == {"steps": 5, "duration_s": 1.0, "delivery": 1}

    # the same envelopes as SSE
    sse = await read_sse(client, job["id"])
    assert [data for _, _, data in sse] == messages


@pytest.mark.slow
async def test_ws_job_resumes_with_last_event_id(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 8, "duration_s": 2})
    url = ws_url(api, f"/api/v1/jobs/{job['id']}/ws")
    async with connect(url) as ws:
        head = [await ws_json(ws) for _ in range(3)]
    tail, code = await ws_collect(f"{url}?last_event_id={head[-1]['seq']}")
    assert code == 1000
    assert tail[-1]["kind"] == "completed"
    full, _ = await ws_collect(url)
    assert head + tail == full
    seqs = [m["seq"] for m in full]
    assert seqs == sorted(set(seqs))


async def test_ws_job_unknown_is_4404(api: ApiServer) -> None:
    job_id = str(uuid.uuid4())
    async with connect(ws_url(api, f"/api/v1/jobs/{job_id}/ws")) as ws:
        error = await ws_json(ws)
        assert error == {"type": "error", "status_code": 404, "detail": f"job {job_id} not found"}
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404
    assert closed.value.rcvd.reason == "job not found"


# WebSocket, many jobs --------------------------------------------------------------------


async def collect_until_done(ws: ClientConnection, job_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Envelopes per job until each of `job_ids` has sent a terminal event; other frames fail."""
    by_job: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in job_ids}
    pending = set(job_ids)
    async with asyncio.timeout(20):
        while pending:
            message = await ws_json(ws)
            assert "type" not in message, message
            assert message["job_id"] in job_ids, message
            by_job[message["job_id"]].append(message)
            if message["kind"] in TERMINAL:
                pending.discard(message["job_id"])
    return by_job


@pytest.mark.slow
async def test_ws_multi_subscribe_jobs(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    a = await submit(client, params={"steps": 3, "duration_s": 0.6})
    b = await submit(client, params={"steps": 3, "duration_s": 0.6})
    async with connect(ws_url(api, "/api/v1/ws")) as ws:
        await ws.send(json.dumps({"action": "subscribe", "job_ids": [a["id"], b["id"]]}))
        assert await ws_json(ws) == {"type": "subscribed", "job_ids": [a["id"], b["id"]], "all": False}
        by_job = await collect_until_done(ws, {a["id"], b["id"]})

        # subscribing again with last_event_id replays only what came after it
        middle = by_job[a["id"]][2]["seq"]
    async with connect(ws_url(api, "/api/v1/ws")) as ws:
        await ws.send(json.dumps({"action": "subscribe", "job_ids": [a["id"]], "last_event_id": middle}))
        assert await ws_json(ws) == {"type": "subscribed", "job_ids": [a["id"]], "all": False}
        resumed = await collect_until_done(ws, {a["id"]})
        assert resumed[a["id"]] == [m for m in by_job[a["id"]] if m["seq"] > middle]
    for job in (a, b):
        got = by_job[job["id"]]
        assert got[0]["kind"] == "submitted"
        assert got[-1]["kind"] == "completed"
        full = await read_sse(client, job["id"])
        assert got == [data for _, _, data in full]  # history + live, nothing missing, nothing twice


@pytest.mark.slow
async def test_ws_multi_subscribers_joining_mid_run_miss_nothing(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    """Live events arriving while a subscription replays history must not hide that history."""
    job = await submit(client, params={"steps": 100, "duration_s": 2})  # ~50 events/s

    async def subscriber(delay: float) -> list[dict[str, Any]]:
        await asyncio.sleep(delay)
        async with connect(ws_url(api, "/api/v1/ws")) as ws:
            await ws.send(json.dumps({"action": "subscribe", "job_ids": [job["id"]]}))
            assert await ws_json(ws) == {"type": "subscribed", "job_ids": [job["id"]], "all": False}
            return (await collect_until_done(ws, {job["id"]}))[job["id"]]

    results = await asyncio.gather(*(subscriber(0.2 + i * 0.04) for i in range(30)))
    full = [data for _, _, data in await read_sse(client, job["id"])]
    assert len(full) > 50
    assert [len(got) for got in results] == [len(full)] * len(results)
    assert all(got == full for got in results)


@pytest.mark.slow
async def test_sse_and_ws_followers_joining_mid_run_miss_nothing(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"steps": 100, "duration_s": 2})

    async def sse(delay: float) -> list[dict[str, Any]]:
        await asyncio.sleep(delay)
        return [data for _, _, data in await read_sse(client, job["id"])]

    async def ws(delay: float) -> list[dict[str, Any]]:
        await asyncio.sleep(delay)
        messages, code = await ws_collect(ws_url(api, f"/api/v1/jobs/{job['id']}/ws"))
        assert code == 1000
        return messages

    results = await asyncio.gather(
        *(sse(0.2 + i * 0.08) for i in range(15)), *(ws(0.24 + i * 0.08) for i in range(15))
    )
    full = [data for _, _, data in await read_sse(client, job["id"])]
    assert full[-1]["kind"] == "completed"
    assert [len(got) for got in results] == [len(full)] * len(results)
    assert all(got == full for got in results)


async def test_ws_multi_subscribe_all(
    api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    async with connect(ws_url(api, "/api/v1/ws")) as ws:
        await ws.send(json.dumps({"action": "subscribe", "all": True}))
        assert await ws_json(ws) == {"type": "subscribed", "job_ids": [], "all": True}
        job = await submit(client, params={"steps": 2, "duration_s": 0.3})
        by_job = await collect_until_done(ws, {job["id"]})
    got = by_job[job["id"]]
    assert [m["kind"] for m in got][:2] == ["submitted", "started"]
    assert got[-1]["kind"] == "completed"
    full = await read_sse(client, job["id"])
    assert got == [data for _, _, data in full]


async def test_ws_multi_errors(api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1})
    await wait_terminal(client, job["id"])
    unknown = str(uuid.uuid4())
    async with connect(ws_url(api, "/api/v1/ws")) as ws:
        await ws.send("{not json")
        error = await ws_json(ws)
        assert error["type"] == "error"
        assert error["status_code"] == 400
        assert error["detail"]

        await ws.send(json.dumps({"action": "shout"}))
        error = await ws_json(ws)
        assert error == {
            "type": "error",
            "status_code": 400,
            "detail": "action: expected 'subscribe' or 'unsubscribe'",
        }

        await ws.send(json.dumps({"action": "subscribe", "job_ids": "x", "bogus": 1}))
        error = await ws_json(ws)
        assert error["type"] == "error"
        assert error["status_code"] == 400

        await ws.send(json.dumps({"action": "subscribe", "job_ids": [unknown, job["id"]]}))
        error = await ws_json(ws)
        assert error == {
            "type": "error",
            "status_code": 404,
            "detail": f"job {unknown} not found",
            "job_id": unknown,
        }
        assert await ws_json(ws) == {"type": "subscribed", "job_ids": [job["id"]], "all": False}
        by_job = await collect_until_done(ws, {job["id"]})
        assert by_job[job["id"]][0]["kind"] == "submitted"
        assert by_job[job["id"]][-1]["kind"] == "completed"

        # still usable after the errors
        await ws.send(json.dumps({"action": "shout"}))
        assert (await ws_json(ws))["status_code"] == 400


@pytest.mark.slow
async def test_ws_multi_unsubscribe(api: ApiServer, client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 6, "duration_s": 1.5})
    async with connect(ws_url(api, "/api/v1/ws")) as ws:
        await ws.send(json.dumps({"action": "subscribe", "job_ids": [job["id"]]}))
        assert (await ws_json(ws))["type"] == "subscribed"
        first = await ws_json(ws)
        assert first["kind"] == "submitted"
        await ws.send(json.dumps({"action": "unsubscribe", "job_ids": [job["id"]]}))
        while (message := await ws_json(ws)).get("type") != "unsubscribed":
            assert message["job_id"] == job["id"]  # events already on their way
        assert message == {"type": "unsubscribed", "job_ids": [job["id"]], "all": False}

        done = await wait_terminal(client, job["id"])
        assert done["status"] == "completed"
        # a round trip: anything of the job's later events would arrive before this reply
        await ws.send(json.dumps({"action": "shout"}))
        reply = await ws_json(ws)
        assert reply["type"] == "error", reply

        # and unsubscribing from everything stops jobs submitted later
        await ws.send(json.dumps({"action": "subscribe", "all": True}))
        assert await ws_json(ws) == {"type": "subscribed", "job_ids": [], "all": True}
        await ws.send(json.dumps({"action": "unsubscribe", "all": True}))
        assert await ws_json(ws) == {"type": "unsubscribed", "job_ids": [], "all": True}
        later = await submit(client, params={"steps": 1})
        await wait_terminal(client, later["id"])
        await ws.send(json.dumps({"action": "shout"}))
        reply = await ws_json(ws)
        assert reply["type"] == "error", reply


# long-poll -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_poll_returns_on_status_change(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 2, "duration_s": 0.5})
    started = time.monotonic()
    response = await client.get(
        f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10, "current_status": "pending"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == job["id"]
    assert body["status"] != "pending"
    assert time.monotonic() - started < 5

    response = await client.get(
        f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10, "current_status": "running"}
    )
    body = response.json()
    assert body["status"] == "completed"
    assert body["progress"] == 100.0
    assert body["result"] == {"steps": 2, "duration_s": 0.5, "delivery": 1}
    assert time.monotonic() - started < 5


@pytest.mark.slow
async def test_poll_since_returns_on_newer_event(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 8, "duration_s": 2})
    running = (
        await client.get(
            f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10, "current_status": "pending"}
        )
    ).json()
    assert running["status"] == "running"
    since = running["last_event_id"]
    started = time.monotonic()
    response = await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10, "since": since})
    assert response.status_code == 200
    newer = response.json()
    assert newer["last_event_id"] > since
    assert newer["status"] == "running"  # same status: only `since` made it return
    assert newer["progress"] > 0
    assert time.monotonic() - started < 2

    # an event newer than `since` already exists: at once
    started = time.monotonic()
    again = (
        await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10, "since": since})
    ).json()
    assert again["last_event_id"] > since
    assert time.monotonic() - started < 0.5


@pytest.mark.slow
async def test_poll_times_out_with_current_state(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1, "duration_s": 3})
    running = (
        await client.get(
            f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10, "current_status": "pending"}
        )
    ).json()
    assert running["status"] == "running"

    started = time.monotonic()
    response = await client.get(
        f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 1, "current_status": "running"}
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == job["id"]
    assert body["status"] == "running"
    assert 0.9 <= elapsed < 1.8, elapsed


async def test_poll_terminal_job_returns_at_once(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1})
    await wait_terminal(client, job["id"])
    started = time.monotonic()
    response = await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": 10})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "completed"
    assert body["id"] == job["id"]
    assert time.monotonic() - started < 0.5


@pytest.mark.slow
async def test_poll_rejects_bad_timeout(client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    job = await submit(client, params={"steps": 1})
    for timeout in ("0", "301", "soon"):
        response = await client.get(f"/api/v1/jobs/{job['id']}/poll", params={"timeout": timeout})
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["status_code"] == 400
        assert "timeout" in json.dumps(body), body


async def test_poll_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    job_id = str(uuid.uuid4())
    response = await client.get(f"/api/v1/jobs/{job_id}/poll", params={"timeout": 1})
    assert response.status_code == 404
    assert response.json() == {"status_code": 404, "detail": f"job {job_id} not found"}


# the SSE fan-out itself ------------------------------------------------------------------


def frame(seq: int, kind: str = "progress") -> bytes:
    return sse_frame(seq, kind, b'{"n":%d}' % seq)


def _applied(seq: int, ends: bool = False) -> Applied:
    return Applied(
        seq, "job", "owner", "completed" if ends else "progress", "running", ends, b'{"n":%d}' % seq
    )


class StoredEvents:
    """A follower's history source: these stored events of a running job (no database needed)."""

    def __init__(self, seqs: list[int]) -> None:
        self.rows = [SimpleNamespace(seq=seq, kind="progress", payload=b'{"n":%d}' % seq) for seq in seqs]
        self.job = SimpleNamespace(owner="owner", status="running", last_event_id=max(seqs, default=0))

    async def history(self, job_id: str, after: int, limit: int | None = None) -> tuple[list[Any], Any]:
        rows = [row for row in self.rows if row.seq > after]
        return rows[:limit], self.job


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_sse_follower_keeps_order_while_a_write_waits_for_the_socket() -> None:
    hub = Hub()
    fanout = SseFanout(hub, ping_s=60)
    bodies: list[tuple[bytes, bool]] = []
    writable = asyncio.Event()

    async def send(message: Any) -> None:
        if len(bodies) == 2 and not writable.is_set():
            await writable.wait()  # the third write finds the socket's buffer full
        bodies.append((message["body"], message["more_body"]))

    follower = SseFollower(fanout, "job", send, 0)
    fanout.attach(follower)
    hub.publish(_applied(1))  # arrives while the history is read: sent once, with it
    hub.publish(_applied(2))
    writer = asyncio.create_task(follower.run(StoredEvents([1]), None))
    await settle()
    # the history, then what arrived meanwhile (seq 1 only once)
    assert bodies == [(frame(1), True), (frame(2), True)]
    hub.publish(_applied(3))
    await settle()  # that write starts, and waits
    hub.publish(_applied(4))
    hub.publish(_applied(5, ends=True))
    hub.publish(_applied(6))  # after the end: never sent
    await settle()
    assert len(bodies) == 2
    writable.set()
    await asyncio.wait_for(writer, 5)
    assert bodies[2:] == [(frame(3), True), (frame(4) + frame(5, "completed"), False)]
    assert follower.done
    assert hub.subscriber_count == 0
    assert hub.buffered == 0
    assert not fanout.followers
    await fanout.close()


async def test_sse_fanout_pings_only_idle_followers() -> None:
    hub = Hub()
    fanout = SseFanout(hub, ping_s=0.05)
    bodies: dict[str, list[bytes]] = {"idle": [], "busy": []}
    ticks = 6
    ticked = asyncio.Event()

    def sender(name: str) -> Any:
        async def send(message: Any) -> None:
            bodies[name].append(message["body"])
            if name == "idle":
                # The idle follower is pinged at each keep-alive tick, and each tick brings the busy
                # job its next event: the busy follower writes between any two ticks on however
                # slow a machine (a fixed sleep between events raced the timer under load).
                hub.publish(_applied(len(bodies["idle"]) + 1))
                if len(bodies["idle"]) == ticks:
                    ticked.set()

        return send

    idle = SseFollower(fanout, "other", sender("idle"), 0)
    busy = SseFollower(fanout, "job", sender("busy"), 0)
    writers = []
    for follower in (idle, busy):
        fanout.attach(follower)
        writers.append(asyncio.create_task(follower.run(StoredEvents([]), None)))
    hub.publish(_applied(1))  # before the first tick
    await asyncio.wait_for(ticked.wait(), 10)
    assert set(bodies["idle"]) == {b": ping\r\n\r\n"}
    assert b": ping\r\n\r\n" not in bodies["busy"]
    assert len(bodies["busy"]) >= ticks
    idle.close()
    busy.close()
    await asyncio.wait_for(asyncio.gather(*writers), 5)
    await fanout.close()
