"""Bounded memory per client: a live client that stops reading is cut off once its buffer is full,
the API's buffers stay bounded, the other clients go on, and the cut-off client resumes by
sequence and misses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Self
from urllib.parse import urlsplit

import h11
import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from app import Settings
from app._exceptions import TooSlowError
from app._hub import Applied, Hub, sse_frame
from app._sse import SseFanout, SseFollower
from jobcast.client import Client
from tests.conftest import TERMINAL, ApiServer, WorkerRunner, submit, wait_terminal
from tests.test_live import StoredEvents as History
from tests.test_metrics import sample
from workers import WorkerSettings

pytestmark = pytest.mark.slow

BUFFER = 64 * 1024
"""The client buffer of these tests' API."""
SEND_BUFFER = 8192
"""SO_SNDBUF of the API's connections: a client that stops reading backs up into the API's own
buffers after some 80 KB (this, its receive buffer and uvicorn's 64 KB), not after the megabytes
the kernel grows its buffers to on loopback."""
RESUME = re.compile(r"^too slow; resume with last_event_id=(\d+)$")
Event = tuple[int, str, str]
"""(seq, job_id, kind) of an envelope."""


@contextlib.asynccontextmanager
async def serving(settings: Settings, buffer: int) -> AsyncIterator[tuple[ApiServer, httpx.AsyncClient]]:
    """The API with a small client buffer (and a grace long enough to read after a cut-off)."""
    server = ApiServer(
        replace(settings, client_buffer_bytes=buffer, slow_client_grace_s=60), send_buffer=SEND_BUFFER
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield server, http
    finally:
        await server.stop()


@pytest.fixture
def workers(worker_settings: WorkerSettings) -> WorkerRunner:
    """A cpu worker running four noop jobs at a time, started by the test once its clients are in."""
    return WorkerRunner(replace(worker_settings, concurrency=4))


def key(envelope: dict[str, Any]) -> Event:
    return envelope["seq"], envelope["job_id"], envelope["kind"]


class RawClient:
    """A client over a plain socket with a small receive buffer, closed when the block ends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


class RawWebSocket(RawClient):
    """A WebSocket client that reads only when told to (websockets' sans-I/O protocol), so that a
    test can stop reading as a stuck client would."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.messages: list[dict[str, Any]] = []
        self._events: deque[Any] = deque()
        self._eof = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.url)
        await loop.sock_connect(self.sock, (parts.hostname, parts.port))
        self.protocol.send_request(self.protocol.connect())
        await self._flush()
        response = await self._next()
        assert isinstance(response, Response), response
        assert response.status_code == 101, response

    async def send_json(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        await self._flush()

    async def next_json(self) -> dict[str, Any]:
        """The next text frame, decoded (and kept in `messages` when it is an envelope)."""
        while True:
            frame = await self._next()
            if frame is None:
                raise ConnectionError("closed")
            if getattr(frame, "opcode", None) == Opcode.TEXT:
                message: dict[str, Any] = json.loads(frame.data)
                if "type" not in message:
                    self.messages.append(message)
                return message

    async def read_to_close(self) -> tuple[int | None, str]:
        """Read every frame until the server closes; the close code and reason (None: no close
        frame, the connection was dropped)."""
        with contextlib.suppress(ConnectionError):
            while True:
                await self.next_json()
        closed = self.protocol.close_rcvd
        return (closed.code, closed.reason) if closed is not None else (None, "")

    async def _next(self) -> Any:
        """The next handshake response or frame; None once the connection has ended."""
        while not self._events:
            if self._eof:
                return None
            data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), 30)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
                self._eof = True
            self._events.extend(self.protocol.events_received())
            await self._flush()  # e.g. the answer to a close frame
        return self._events.popleft()

    async def _flush(self) -> None:
        data = b"".join(self.protocol.data_to_send())
        if data:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(self.sock, data)


class RawSse(RawClient):
    """An SSE client (h11) that reads only when told to."""

    def __init__(self, api: ApiServer, path: str) -> None:
        super().__init__()
        self.api, self.path = api, path
        self.http = h11.Connection(h11.CLIENT)
        self.body = b""

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.api.port))
        headers = [("Host", f"127.0.0.1:{self.api.port}"), ("Accept", "text/event-stream")]
        request = h11.Request(method="GET", target=self.path, headers=headers)
        await loop.sock_sendall(self.sock, self.http.send(request) + self.http.send(h11.EndOfMessage()))
        while not isinstance(event := await self._next(), h11.Response):
            pass
        assert event.status_code == 200, event

    async def events(self, count: int) -> None:
        """Read until `count` events have come."""
        while len(parse_sse(self.body)[0]) < count:
            event = await self._next()
            assert not isinstance(event, h11.EndOfMessage | h11.ConnectionClosed), self.body[-300:]

    async def read_to_end(self) -> bool:
        """Read until the stream ends; True when it ended properly (False: dropped)."""
        while True:
            try:
                event = await self._next()
            except h11.RemoteProtocolError:  # the connection ended in the middle of the body
                return False
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return True

    async def _next(self) -> Any:
        while (event := self.http.next_event()) is h11.NEED_DATA:
            data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), 30)
            self.http.receive_data(data)
        if isinstance(event, h11.Data):
            self.body += event.data
        return event


def parse_sse(body: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """The envelopes and the comments of a raw SSE body (complete messages only)."""
    envelopes, comments = [], []
    for block in body.split(b"\r\n\r\n")[:-1]:
        fields = dict(
            line.split(": ", 1) for line in block.decode().split("\r\n") if not line.startswith(":")
        )
        comments += [line[2:] for line in block.decode().split("\r\n") if line.startswith(": ")]
        if "data" in fields:
            envelope = json.loads(fields["data"])
            assert int(fields["id"]) == envelope["seq"]
            assert fields["event"] == envelope["kind"]
            envelopes.append(envelope)
    return envelopes, comments


async def metric(client: httpx.AsyncClient, name: str) -> int:
    return int(sample((await client.get("/metrics")).text, name))


class Sampler:
    """Reads the API's buffered bytes every 50 ms while a test runs."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.samples: list[int] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append(await metric(self.client, "jobcast_client_buffered_bytes"))
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_cut_offs(client: httpx.AsyncClient, count: int) -> None:
    """Poll /metrics until `count` clients have been cut off."""
    async with asyncio.timeout(30):
        while await metric(client, "jobcast_clients_cut_off_total") < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def until_reply(ws: ClientConnection) -> list[dict[str, Any]]:
    """Envelopes until the error reply to a bogus command sent now: a command is answered only
    after the replay of the one before it is out."""
    await ws.send(json.dumps({"action": "ping"}))
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while "type" not in (message := json.loads(await ws.recv())):
            got.append(message)
    assert message["type"] == "error", message
    return got


async def everything(api: ApiServer, after: int = 0) -> list[dict[str, Any]]:
    """Every stored event of the caller's jobs after `after`, replayed by a fresh /api/v1/ws."""
    async with connect(api.url.replace("http", "ws") + "/api/v1/ws", max_size=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "all": True, "last_event_id": after}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        return await until_reply(ws)


async def submit_batches(
    client: httpx.AsyncClient, batches: int, size: int, duration_s: float = 0
) -> list[dict[str, Any]]:
    """Batches of noop jobs that each make three events (submitted, started, completed)."""
    parents = []
    params = {"steps": 0, "duration_s": duration_s}
    for _ in range(batches):
        answer = await client.post(
            "/api/v1/jobs/batch", json={"type": "noop", "items": [{}] * size, "params": params}
        )
        assert answer.status_code == 202, answer.text
        parents.append(answer.json())
    return parents


async def test_all_jobs_socket_that_never_reads_is_cut_off_and_resumes(
    settings: Settings, workers: WorkerRunner
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        api, client = await stack.enter_async_context(serving(settings, BUFFER))
        ws_url = api.url.replace("http", "ws") + "/api/v1/ws"
        stuck = stack.enter_context(RawWebSocket(ws_url))
        await stuck.open()
        await stuck.send_json({"action": "subscribe", "all": True})
        assert await stuck.next_json() == {"type": "subscribed", "job_ids": [], "all": True}
        # from here on, `stuck` reads nothing until the jobs are done

        reader = await stack.enter_async_context(connect(ws_url, max_size=None))
        await reader.send(json.dumps({"action": "subscribe", "all": True}))
        assert json.loads(await reader.recv())["type"] == "subscribed"
        seen: list[dict[str, Any]] = []
        parents: list[dict[str, Any]] = []
        done = asyncio.Event()

        async def read() -> None:  # a client that keeps up: sees each batch end, live
            ended: set[str] = set()
            async for raw in reader:
                seen.append(json.loads(raw))
                if seen[-1]["kind"] in TERMINAL:
                    ended.add(seen[-1]["job_id"])
                if parents and ended >= {p["id"] for p in parents}:
                    done.set()

        reading = asyncio.create_task(read())
        sampler = Sampler(client)
        parents += await submit_batches(client, 5, 100)
        await workers.start()
        try:
            await wait_cut_offs(client, 1)
            for parent in parents:
                assert (await wait_terminal(client, parent["id"], timeout=60))["status"] == "completed"
            async with asyncio.timeout(10):  # the reader has them all within seconds
                await done.wait()
            # the stuck client is still connected and not reading, yet nothing waits for it
            assert await metric(client, "jobcast_client_buffered_bytes") == 0
        finally:
            reading.cancel()
            await sampler.stop()
            await workers.stop()
        assert await metric(client, "jobcast_clients_cut_off_total") == 1  # the reader never was

        truth = await everything(api)
        assert len(truth) >= 5 * 100 * 3
        assert sorted(map(key, seen)) == sorted(map(key, truth))  # the reader: everything, once
        assert max(sampler.samples) <= 2 * BUFFER + 100 * 2048  # two clients: each its buffer + a batch

        # the stuck client gets what was written before the cut-off, then 4008 naming where to resume
        code, reason = await stuck.read_to_close()
        assert code == 4008, (code, reason)
        match = RESUME.match(reason)
        assert match, reason
        resume = int(match.group(1))
        got = [key(m) for m in stuck.messages]
        assert len(got) < len(truth) / 2
        assert {e for e in map(key, truth) if e[0] <= resume} <= set(got)  # nothing up to there missed

        resumed = await everything(api, resume)  # and subscribing again after it brings the rest
        assert sorted(map(key, resumed)) == sorted(e for e in map(key, truth) if e[0] > resume)


async def test_job_streams_that_never_read_are_cut_off_and_resume(
    settings: Settings, workers: WorkerRunner
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # A batch parent's events are small (~360 bytes), hence the smaller buffer.
        api, client = await stack.enter_async_context(serving(settings, 4096))
        (parent,) = await submit_batches(client, 1, 1000, duration_s=0.005)
        path = f"/api/v1/jobs/{parent['id']}"
        stuck_sse = stack.enter_context(RawSse(api, f"{path}/events"))
        await stuck_sse.open()
        await stuck_sse.events(1)
        stuck_ws = stack.enter_context(RawWebSocket(api.url.replace("http", "ws") + f"{path}/ws"))
        await stuck_ws.open()
        await stuck_ws.next_json()
        # and `jobcast watch`'s client, which stops reading after the first event until told to
        cli = Client(api.url, None)
        small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
        cli.http = stack.enter_context(httpx.Client(base_url=api.url, timeout=30, transport=small))
        cli_started, cli_go_on = threading.Event(), threading.Event()

        def watch() -> list[dict[str, Any]]:
            got = []
            for event in cli.events(parent["id"]):
                got.append(event)
                cli_started.set()
                cli_go_on.wait(60)
            return got

        cli_events = asyncio.create_task(asyncio.to_thread(watch))
        await asyncio.to_thread(cli_started.wait, 10)
        # from here on, none of them reads until the batch is done; another SSE client reads along

        async def read_sse() -> list[dict[str, Any]]:
            async with aconnect_sse(client, "GET", f"{path}/events") as source:
                return [json.loads(sse.data) async for sse in source.aiter_sse() if sse.data]

        reading = asyncio.create_task(read_sse())
        sampler = Sampler(client)
        await workers.start()
        try:
            await wait_cut_offs(client, 3)
            assert (await wait_terminal(client, parent["id"], timeout=60))["status"] == "completed"
            live = await asyncio.wait_for(reading, 10)
            assert await metric(client, "jobcast_client_buffered_bytes") == 0
        finally:
            cli_go_on.set()
            reading.cancel()
            await sampler.stop()
            await workers.stop()
        assert await metric(client, "jobcast_clients_cut_off_total") == 3
        async with aconnect_sse(client, "GET", f"{path}/events") as source:
            truth = [json.loads(sse.data) async for sse in source.aiter_sse() if sse.data]
        assert len(truth) > 300
        assert live == truth  # the client that reads: everything, in order, and its stream ended
        assert max(sampler.samples) <= 4 * (4096 + 1024)  # four clients: each its buffer + a batch
        # the CLI's client went on after the last event it had got, and so missed nothing
        assert await asyncio.wait_for(cli_events, 30) == truth

        # SSE: what was written, then a comment naming the Last-Event-ID, and the end of the stream
        assert await stuck_sse.read_to_end()
        head, comments = parse_sse(stuck_sse.body)
        assert comments[-1].startswith("too slow, cut off; reconnect with Last-Event-ID: "), comments
        last = int(comments[-1].rsplit(" ", 1)[1])
        assert last == head[-1]["seq"]
        assert head == truth[: len(head)]
        assert len(head) < len(truth)
        resume_sse = {"Last-Event-ID": str(last)}
        async with aconnect_sse(client, "GET", f"{path}/events", headers=resume_sse) as source:
            tail = [json.loads(sse.data) async for sse in source.aiter_sse() if sse.data]
        assert head + tail == truth

        # WebSocket: close 4008, the reason naming the last_event_id to reconnect with
        code, reason = await stuck_ws.read_to_close()
        assert code == 4008, (code, reason)
        match = RESUME.match(reason)
        assert match, reason
        resume = int(match.group(1))
        head = stuck_ws.messages
        assert head == truth[: len(head)]
        assert head[-1]["seq"] == resume  # one stream of one job: exactly where it stopped
        tail = []
        async with connect(api.url.replace("http", "ws") + f"{path}/ws?last_event_id={resume}") as ws:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    tail.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        assert ws.close_code == 1000
        assert head + tail == truth


async def test_a_socket_follows_a_bounded_number_of_job_ids(settings: Settings) -> None:
    server = ApiServer(replace(settings, ws_max_jobs=3))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            ids = [(await submit(client))["id"] for _ in range(4)]
            async with connect(server.url.replace("http", "ws") + "/api/v1/ws") as ws:
                await ws.send(json.dumps({"action": "subscribe", "job_ids": ids[:3]}))
                assert json.loads(await ws.recv()) == {"type": "subscribed", "job_ids": ids[:3], "all": False}
                for _ in range(3):  # their `submitted` events
                    assert json.loads(await ws.recv())["kind"] == "submitted"
                await ws.send(json.dumps({"action": "subscribe", "job_ids": ids[3:]}))
                assert json.loads(await ws.recv()) == {
                    "type": "error",
                    "status_code": 429,
                    "detail": "a socket may follow at most 3 job ids; subscribe to all instead",
                }
                await ws.send(json.dumps({"action": "unsubscribe", "job_ids": ids[:1]}))
                assert json.loads(await ws.recv())["type"] == "unsubscribed"
                await ws.send(json.dumps({"action": "subscribe", "job_ids": ids[3:]}))  # room again
                assert json.loads(await ws.recv()) == {"type": "subscribed", "job_ids": ids[3:], "all": False}
    finally:
        await server.stop()


# the bounds themselves, without sockets --------------------------------------------------


def applied(seq: int, size: int = 100, job_id: str = "job", ends: bool = False) -> Applied:
    return Applied(seq, job_id, "owner", "progress", "running", ends, b"x" * size)


async def test_a_subscriber_that_keeps_up_is_never_cut_off_even_by_a_burst() -> None:
    hub = Hub(client_buffer=1000)
    with hub.subscribe(owner="owner") as sub:
        for start in range(1, 100, 20):
            hub.publish_all([applied(seq) for seq in range(start, start + 20)])  # 2000 bytes at once
            assert hub.buffered == 2000
            assert [(await sub.get()).seq for _ in range(20)] == list(range(start, start + 20))
        assert sub.resume_after is None
        assert hub.buffered == 0
    assert hub.cut_offs == 0


async def test_a_subscriber_behind_by_more_than_its_buffer_is_cut_off() -> None:
    hub = Hub(client_buffer=1000)
    with hub.subscribe(owner="owner") as sub:
        sub.cut_off = asyncio.get_running_loop().create_future()
        hub.publish_all([applied(seq) for seq in range(1, 12)])  # 1,100 bytes: over, but one batch
        assert (await sub.get()).seq == 1  # one taken, the rest still waits: 1,000 bytes
        hub.publish(applied(12))
        assert sub.resume_after is None  # not over the bound
        assert (await sub.get()).seq == 2  # in flight when the client stops reading
        hub.publish_all([applied(seq) for seq in (13, 14)])  # 1,100 bytes waiting now
        hub.publish(applied(15))  # the next batch finds it over: cut off
        assert sub.cut_off.done()
        assert sub.resume_after == 2  # everything up to 2 was taken; 3 on was dropped
        assert hub.buffered == 0
        assert hub.cut_offs == 1
        with pytest.raises(TooSlowError) as raised:
            await sub.get()
        assert raised.value.resume_after == 2
        hub.publish(applied(16))  # ignored from then on
        assert hub.buffered == 0


async def test_a_cut_off_sse_follower_ends_its_stream_with_where_to_resume() -> None:
    hub = Hub(client_buffer=300)
    fanout = SseFanout(hub, ping_s=60, grace_s=30)
    bodies: list[tuple[bytes, bool]] = []
    writable = asyncio.Event()

    async def send(message: Any) -> None:
        if bodies and not writable.is_set():
            await writable.wait()  # the second write finds the socket full until the client reads
        bodies.append((message["body"], message["more_body"]))

    follower = SseFollower(fanout, "job", send, 0)
    fanout.attach(follower)
    writer = asyncio.create_task(follower.run(History([]), None))
    for seq in range(1, 8):
        hub.publish(applied(seq))  # a frame of about 150 bytes each
        await asyncio.sleep(0)
    assert follower.cut
    assert hub.buffered == 0
    assert bodies == [(sse_frame(1, "progress", b"x" * 100), True)]
    writable.set()  # the client reads again: the write in flight, then the goodbye
    await asyncio.wait_for(writer, 5)
    assert bodies[1] == (sse_frame(2, "progress", b"x" * 100), True)
    assert bodies[2:] == [(b": too slow, cut off; reconnect with Last-Event-ID: 2\r\n\r\n", False)]
    assert not fanout.followers
    assert hub.subscriber_count == 0
    await fanout.close()


async def test_a_cut_off_sse_follower_that_never_reads_is_dropped_after_the_grace() -> None:
    hub = Hub(client_buffer=300)
    fanout = SseFanout(hub, ping_s=60, grace_s=0.2)
    bodies: list[bytes] = []

    async def send(message: Any) -> None:
        if bodies:
            await asyncio.Event().wait()  # never writable again
        bodies.append(message["body"])

    follower = SseFollower(fanout, "job", send, 0)
    fanout.attach(follower)
    writer = asyncio.create_task(follower.run(History([]), None))
    for seq in range(1, 8):
        hub.publish(applied(seq))
        await asyncio.sleep(0)
    assert follower.cut
    await asyncio.wait_for(writer, 5)  # returns once the grace is over, the response unfinished
    assert len(bodies) == 1
    assert not fanout.followers
    assert hub.buffered == 0
    await fanout.close()


# the projection's queue ---------------------------------------------------------------------

JOB_FIELDS = ("id", "status", "attempt", "progress", "result", "error", "last_event_id", "parent_id")


async def all_jobs(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    while True:
        params = {"include_children": "true", "limit": 500, "offset": len(jobs)}
        page = (await client.get("/api/v1/jobs", params=params)).json()
        jobs += [{name: job[name] for name in JOB_FIELDS} for job in page["items"]]
        if len(jobs) >= page["total"]:
            return sorted(jobs, key=lambda job: job["id"])


def stream_events(envelopes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The envelopes of the stream's events (a batch parent's derived ones depend on how the
    projection happened to batch its children's)."""
    return [envelope for envelope in envelopes if not envelope["event"].get("derived")]


async def caught_up(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(60):
        while (await client.get("/ready")).status_code != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_projection_queue_is_bounded_and_loses_nothing(
    settings: Settings, workers: WorkerRunner
) -> None:
    """A tiny bound, hit both while jobs run and while a deleted database is rebuilt from the
    stream: the consumer restarts after the last message queued, and every event is applied."""
    bounded = replace(settings, projection_queue=20)
    api = ApiServer(bounded)
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            parents = await submit_batches(client, 2, 200)
            await workers.start()
            try:
                for parent in parents:
                    assert (await wait_terminal(client, parent["id"], timeout=60))["status"] == "completed"
            finally:
                await workers.stop()
            before, events_before = await all_jobs(client), stream_events(await everything(api))
        assert len(before) == 402
        assert len(events_before) == 402 + 400 * 2
        await api.stop()
        for suffix in ("", "-wal", "-shm"):
            (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)

        await api.start()  # catches up from the first message, 20 at a time
        assert api.app is not None
        projection = api.app.state.projection
        queued: list[int] = []
        projection.hub.listeners.append(lambda _: queued.append(projection.queued))
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            await caught_up(client)
            assert await all_jobs(client) == before
            assert stream_events(await everything(api)) == events_before
            restarts = await metric(client, "jobcast_projection_restarts_total")
        assert restarts >= 10  # the bound was hit, over and over
        assert queued
        assert max(queued) <= 21  # the bound, and the marker that stops the consumer
    finally:
        await api.stop()
