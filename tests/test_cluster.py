"""jobcast on a 3-node JetStream cluster: R3 storage, several API instances, a node lost under load."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
import pytest
from httpx_sse import aconnect_sse
from nats.aio.client import Client
from nats.js import JetStreamContext

from app import Settings, create_app
from streams import (
    DECLARE_TIMEOUT_S,
    STREAM,
    ApiKeyRecord,
    NatsServer,
    ReplicasError,
    cache_bucket,
    cache_files_store,
    callbacks_bucket,
    close_quietly,
    connect,
    ensure_jetstream,
    ensure_stream,
    files_store,
    keys_bucket,
    nats_servers,
    riding_out,
    workers_bucket,
)
from tests.chaos._procs import sse_history
from tests.cluster import NatsCluster, running_cluster
from tests.conftest import ApiServer, WorkerRunner, submit, wait_terminal
from tests.test_admin import Receiver, wait_for
from workers import WorkerSettings

pytestmark = pytest.mark.slow

ADMIN_KEY = "cluster-admin-key-" + "x" * 20
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BUCKETS = (
    "KV_JOBCAST_KEYS", "KV_JOBCAST_CALLBACKS", "KV_JOBCAST_WORKERS", "OBJ_JOBCAST_FILES", "KV_JOBCAST_CACHE",
    "OBJ_JOBCAST_CACHE_FILES",
)  # fmt: skip
"""The streams under jobcast's KV buckets and object store (named as NATS names them)."""
Seen = list[tuple[int, str]]


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A fresh 3-node JetStream cluster on loopback, each node with its own store and free ports."""
    async with running_cluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
def replicated(monkeypatch: pytest.MonkeyPatch) -> None:
    """JOBCAST_STREAM_REPLICAS=3 for the processes this test starts (in-process ones read it too)."""
    monkeypatch.setenv("JOBCAST_STREAM_REPLICAS", "3")


@contextlib.asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    """The test's own connection, to any node of `url`."""
    nc = await connect(url, name="test")
    try:
        yield nc, nc.jetstream(timeout=3)
    finally:
        await close_quietly(nc)


def api_settings(tmp_path: Path, name: str, nats_url: str, **extra: Any) -> Settings:
    """An API instance's settings: its own data dir (no shared disk), fast timers."""
    return Settings(
        data_dir=tmp_path / name, nats_url=nats_url, sse_ping_s=0.5, submit_timeout_s=10,
        rate_limit_per_minute=10**6, **extra,
    )  # fmt: skip


def worker_settings(nats_url: str, name: str) -> WorkerSettings:
    """A cpu worker that takes eight jobs at once.

    Its ack wait stays well above a leader election (a few seconds): the in_progress() that keeps a
    running job from being redelivered does not reach a consumer that is electing its leader, so a
    failover longer than the ack wait would hand a running job to a second run (docs/deploy.md).
    """
    return WorkerSettings(
        pool="cpu", nats_url=nats_url, ack_wait_s=15, grace_s=2, retry_base_s=0.2, name=name, concurrency=8
    )


@contextlib.asynccontextmanager
async def serving(*servers: ApiServer | WorkerRunner) -> AsyncIterator[None]:
    """Start API instances and workers in order; stop them all when the block ends."""
    started: list[ApiServer | WorkerRunner] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        yield
    finally:
        for server in reversed(started):
            await server.stop()


async def leader(js: JetStreamContext, stream: str = STREAM, timeout: float = 30) -> str:
    """The server_name of the node that leads `stream`, once it has one."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                info = await js.stream_info(stream)
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
            await asyncio.sleep(0.1)


async def lead_from(
    nc: Client, js: JetStreamContext, name: str, stream: str = STREAM, timeout: float = 30
) -> None:
    """Move `stream`'s leadership to node `name` (a stepdown that names its successor)."""
    request = json.dumps({"placement": {"preferred": name}}).encode()
    async with asyncio.timeout(timeout):
        while (current := await leader(js, stream)) != name:
            with contextlib.suppress(nats.errors.Error):
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=3)
            while await leader(js, stream) == current:  # noqa: ASYNC110 - the election is the server's
                await asyncio.sleep(0.1)


async def replicas_current(js: JetStreamContext, timeout: float = 30) -> None:
    """Until the JOBS stream has a leader and both its followers are current (caught up)."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                info = await js.stream_info(STREAM)
                peers = (info.cluster.replicas or []) if info.cluster and info.cluster.leader else []
                if len(peers) == 2 and all(
                    peer.current and not peer.offline and not peer.lag for peer in peers
                ):
                    return
            await asyncio.sleep(0.2)


def connected_port(server: ApiServer | WorkerRunner) -> int | None:
    """The client port of the node a process is connected to now."""
    nc = server.app.state.nats if isinstance(server, ApiServer) else server.worker.nc  # type: ignore[union-attr]
    assert nc is not None
    url = nc.connected_url
    return url.port if url is not None else None


async def completed_everywhere(clients: list[httpx.AsyncClient], job_ids: list[str], timeout: float) -> None:
    """Until every job is completed on every API instance (they poll their own projections)."""
    async with asyncio.timeout(timeout):
        for http in clients:
            for job_id in job_ids:
                done = await wait_terminal(http, job_id, timeout=timeout)
                assert done["status"] == "completed", done


async def histories_agree(clients: list[httpx.AsyncClient], job_ids: list[str]) -> dict[str, Seen]:
    """Each job's events, which every instance must show alike (same stream sequences, same kinds);
    each completed exactly once."""
    histories: dict[str, Seen] = {}
    for job_id in job_ids:
        seen = [[(seq, kind) for seq, kind, _ in await sse_history(http, job_id)] for http in clients]
        assert all(each == seen[0] for each in seen), (job_id, seen)
        assert Counter(kind for _, kind in seen[0])["completed"] == 1, (job_id, seen[0])
        histories[job_id] = seen[0]
    return histories


# settings ---------------------------------------------------------------------------------------


def test_nats_url_takes_a_comma_separated_list() -> None:
    assert nats_servers(" nats://a:4222, nats://t0k3n@b:4223 ,tls://c:4224") == [
        "nats://a:4222", "nats://t0k3n@b:4223", "tls://c:4224",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"'http://b:1' is not a NATS URL") as raised:
        Settings(nats_url="nats://a:4222,http://user:secret@b:1")
    assert "secret" not in str(raised.value)
    with pytest.raises(ValueError, match="names no server"):
        WorkerSettings(nats_url=" , ")


async def test_replicas_beyond_one_server_are_refused_clearly(
    nats_server: NatsServer, replicated: None
) -> None:
    async with nats_client(nats_server.url) as (_, js):
        with pytest.raises(ReplicasError, match="JOBCAST_STREAM_REPLICAS=3 needs a JetStream cluster"):
            await ensure_stream(js)
        with pytest.raises(ReplicasError, match="KV bucket JOBCAST_KEYS cannot be created with 3 replicas"):
            await keys_bucket(js)
        # A permanent error is not ridden out like JetStream not being ready: the API fails at once.
        started = time.monotonic()
        with pytest.raises(ReplicasError, match="JOBCAST_STREAM_REPLICAS=3 needs a JetStream cluster"):
            await ensure_jetstream(js)
        assert time.monotonic() - started < DECLARE_TIMEOUT_S / 3


async def test_an_api_started_before_its_cluster_has_a_leader_waits_for_it(tmp_path: Path) -> None:
    # Seen in CI: an API that starts while the cluster's meta leader is not there (or too busy to
    # answer) got a timeout from its stream declaration, and its start crashed. A node alone has no
    # meta leader: its JetStream times out, then answers 503 (no responders), until its peers join.
    cluster = NatsCluster(tmp_path / "cluster")
    first, *peers = cluster.nodes
    waiting = asyncio.Event()

    class Waits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING and "JetStream is not ready" in record.getMessage():
                waiting.set()

    handler = Waits()
    logging.getLogger("jobcast.streams").addHandler(handler)

    async def join_once_it_waits() -> None:
        await asyncio.wait_for(waiting.wait(), 30)
        await asyncio.gather(*(node.start() for node in peers))

    try:
        await first.start()
        joining = asyncio.create_task(join_once_it_waits())
        app = create_app(api_settings(tmp_path, "a", first.url))
        try:
            # The app's own lifespan, in this loop (the test client would run it in another thread).
            async with (
                asyncio.timeout(90),
                app.lifespan(),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client,
            ):
                await joining  # it did wait, and the cluster is whole
                ready = await wait_for(lambda: ready_body(client), timeout=30)
                assert ready["status"] == "ready"
                job = await client.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 1}})
                assert job.status_code == 202, job.text
                assert job.json()["status"] == "pending"
        finally:
            joining.cancel()
    finally:
        logging.getLogger("jobcast.streams").removeHandler(handler)
        await cluster.stop()


async def ready_body(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """/ready's body once it answers 200, else None."""
    response = await client.get("/ready")
    return response.json() if response.status_code == 200 else None


# the cluster ------------------------------------------------------------------------------------


async def test_two_apis_on_two_nodes_and_a_worker_on_the_third(
    nats_cluster: NatsCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n0, n1, n2 = nats_cluster.nodes
    async with nats_client(nats_cluster.url) as (_, js):
        # A deployment that began on one replica: everything exists with R1 before the APIs start.
        await ensure_stream(js)
        for make in (
            keys_bucket,
            callbacks_bucket,
            workers_bucket,
            files_store,
            cache_bucket,
            cache_files_store,
        ):
            await make(js)
        assert {(await js.stream_info(name)).config.num_replicas for name in (STREAM, *BUCKETS)} == {1}
        monkeypatch.setenv("JOBCAST_STREAM_REPLICAS", "3")

        extra = {"admin_key": ADMIN_KEY, "webhook_allow_loopback": True, "webhook_backoff_s": 0.05}
        api_a = ApiServer(api_settings(tmp_path, "a", n0.url, **extra))
        api_b = ApiServer(api_settings(tmp_path, "b", n1.url, **extra))
        worker = WorkerRunner(worker_settings(n2.url, "on-n2"))
        async with (
            serving(api_a, api_b, worker),
            Receiver([200]) as hook,
            httpx.AsyncClient(base_url=api_a.url, headers=AUTH, timeout=30) as a,
            httpx.AsyncClient(base_url=api_b.url, headers=AUTH, timeout=30) as b,
        ):
            assert [connected_port(s) for s in (api_a, api_b, worker)] == [n.port for n in (n0, n1, n2)]
            # The APIs raised the stream, the buckets and the files store to three replicas, the
            # worker the stage cache's bucket and store.
            for name in (STREAM, *BUCKETS):
                info = await js.stream_info(name)
                assert info.config.num_replicas == 3, name
                assert info.cluster is not None
                assert info.cluster.leader in {"n0", "n1", "n2"}
                assert sorted(p.name for p in info.cluster.replicas or []) == sorted(
                    {"n0", "n1", "n2"} - {info.cluster.leader}
                ), name

            jobs: list[dict[str, Any]] = []
            for index in range(10):
                via, other = (a, b) if index % 2 == 0 else (b, a)
                body: dict[str, Any] = {"params": {"steps": 2}}
                if index == 0:
                    body["callback_url"] = hook.url
                job = await submit(via, **body)
                jobs.append(job)
                # Read-your-writes on the other instance, at once: never a 404.
                seen = await other.get(f"/api/v1/jobs/{job['id']}")
                assert seen.status_code == 200, seen.text
                assert seen.json()["id"] == job["id"]
            ids = [job["id"] for job in jobs]
            await completed_everywhere([a, b], ids, timeout=30)
            for http in (a, b):
                for job_id in ids:
                    assert (await http.get(f"/api/v1/jobs/{job_id}")).json()["worker"] == "on-n2"
            await histories_agree([a, b], ids)

            # Webhooks: two instances, one delivery.
            async def delivered() -> bool:
                views = [(await http.get(f"/api/v1/jobs/{ids[0]}")).json() for http in (a, b)]
                return all(view["callback_status"] == "delivered" for view in views)

            await wait_for(delivered)
            await asyncio.sleep(0.3)  # a second delivery would have come by now
            assert [h["x-jobcast-delivery"] for h, _ in hook.requests] == [f"{ids[0]}.1"]

            # Heartbeats: both instances see the worker on n2.
            async def worker_seen() -> bool:
                stats = [(await http.get("/api/v1/jobs/queue/stats")).json() for http in (a, b)]
                return all(each["active_workers"] == 1 for each in stats)

            await wait_for(worker_seen)

            # Keys: a node that holds a key watch's consumer dies (n2, the worker's, when it is one;
            # an API on another reconnects to a node the cluster announced). `jobcast keys`, given the
            # whole cluster, creates a key, and both instances take it: their watches go on.
            watches = await js.consumers_info(BUCKETS[0])
            hosts = sorted({info.cluster.leader for info in watches if info.cluster and info.cluster.leader})
            assert len(watches) == 2, watches
            assert hosts, watches
            nats_cluster.node("n2" if "n2" in hosts else hosts[0]).kill()
            await nats_cluster.wait_ready(replicas=2)  # a meta leader again
            await leader(js, BUCKETS[0])  # and the bucket's
            key = await jobcast_cli(nats_cluster.url, tmp_path, "keys", "create", "--name", "alice")
            alice = {"Authorization": f"Bearer {key.strip()}"}

            async def accepted_by_both() -> bool:
                answers = [await http.get("/api/v1/jobs", headers=alice) for http in (a, b)]
                return all(answer.status_code == 200 for answer in answers)

            await wait_for(accepted_by_both)

        # Replicas are never lowered by a process that asks for fewer.
        monkeypatch.setenv("JOBCAST_STREAM_REPLICAS", "1")
        with caplog.at_level(logging.WARNING, logger="jobcast.streams"):
            # As an API's start does it: riding out a cluster too busy to answer in time.
            await riding_out("the JOBS stream", lambda: ensure_stream(js))
        assert (await js.stream_info(STREAM)).config.num_replicas == 3
        assert "JOBCAST_STREAM_REPLICAS=1 is below the 3 replicas of the JOBS stream" in caplog.text
        assert (await js.stream_info("KV_JOBCAST_KEYS")).config.num_replicas == 3


async def jobcast_cli(nats_url: str, tmp_path: Path, *args: str) -> str:
    """What `jobcast ARGS` prints, run against `nats_url`; it must succeed within 30 s."""
    env = dict(os.environ, JOBCAST_NATS_URL=nats_url, JOBCAST_DATA_DIR=str(tmp_path / "cli"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobcast", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_a_key_watch_whose_consumer_is_gone_starts_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    api = ApiServer(api_settings(tmp_path, "a", nats_server.url, admin_key=ADMIN_KEY))
    async with (
        serving(api),
        nats_client(nats_server.url) as (_, js),
        httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=30) as http,
    ):
        # What the death of the cluster node that held it does to the watch: its consumer is gone,
        # and nothing tells nats-py.
        watches = await js.consumers_info(BUCKETS[0])
        assert len(watches) == 1, watches
        await js.delete_consumer(BUCKETS[0], watches[0].name)
        key = "jc_" + uuid.uuid4().hex
        record = ApiKeyRecord(
            name="alice", sha256=hashlib.sha256(key.encode()).hexdigest(), created_at=time.time()
        )
        await (await keys_bucket(js)).create("alice", msgspec.json.encode(record))

        async def accepted() -> bool:
            return (
                await http.get("/api/v1/jobs", headers={"Authorization": f"Bearer {key}"})
            ).status_code == 200

        await wait_for(accepted)


async def test_instances_read_each_others_writes(nats_server: NatsServer, tmp_path: Path) -> None:
    # B applies the stream slowly: a one-message projection queue makes it resubscribe after each
    # message, so it is always behind A when a burst comes.
    api_a = ApiServer(api_settings(tmp_path, "a", nats_server.url))
    api_b = ApiServer(api_settings(tmp_path, "b", nats_server.url, projection_queue=1))
    async with (
        serving(api_a, api_b),
        httpx.AsyncClient(base_url=api_a.url, timeout=30) as a,
        httpx.AsyncClient(base_url=api_b.url, timeout=30) as b,
    ):
        accepted = await a.post("/api/v1/jobs/batch", json={"type": "noop", "items": [{}] * 60})
        assert accepted.status_code == 202, accepted.text
        parent = accepted.json()["id"]
        last_child = str(uuid.uuid5(uuid.UUID(parent), "59"))
        written = int(accepted.headers["x-jobcast-seq"])
        # B, asked at once, answers for the job A accepted: it waits for its projection.
        seen = await b.get(f"/api/v1/jobs/{last_child}")
        assert seen.status_code == 200, seen.text
        assert seen.json()["parent_id"] == parent
        assert int(seen.headers["x-jobcast-seq"]) >= written
        # A write through A, read through B with the sequence A answered with: B shows it.
        cancelled = await a.post(f"/api/v1/jobs/{parent}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        after = await b.get(
            f"/api/v1/jobs/{parent}", headers={"X-Jobcast-Seq": cancelled.headers["x-jobcast-seq"]}
        )
        assert after.json()["status"] == "cancelled", after.text
        # A job that exists nowhere is a 404 at once; a sequence the stream has not reached is a 400.
        missing = await b.get(f"/api/v1/jobs/{uuid.uuid4()}")
        assert missing.status_code == 404, missing.text
        beyond = await b.get("/api/v1/jobs", headers={"X-Jobcast-Seq": str(written + 10**6)})
        assert beyond.status_code == 400
        assert "beyond the job log" in beyond.json()["detail"]


class Follower:
    """An SSE client of one job that moves to the other API instance (with Last-Event-ID) after
    `switch_after` events, and again whenever its stream ends early; records what it saw and the
    longest wait between two events."""

    def __init__(self, clients: list[httpx.AsyncClient], job_id: str, switch_after: int = 3) -> None:
        self.clients = clients
        self.job_id = job_id
        self.switch_after = switch_after
        self.seen: Seen = []
        self.longest_wait = 0.0
        self.reconnects = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_at = loop.time()
        turn = 0
        while not self.seen or self.seen[-1][1] not in {"completed", "failed", "cancelled"}:
            http = self.clients[turn % len(self.clients)]
            turn += 1
            headers = {"Last-Event-ID": str(self.seen[-1][0])} if self.seen else {}
            with contextlib.suppress(httpx.TransportError):
                async with aconnect_sse(
                    http, "GET", f"/api/v1/jobs/{self.job_id}/events", headers=headers
                ) as source:
                    assert source.response.status_code == 200, await source.response.aread()
                    count = 0
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue  # a keep-alive comment
                        now = loop.time()
                        self.longest_wait, last_at = max(self.longest_wait, now - last_at), now
                        self.seen.append((int(sse.id), sse.event))
                        count += 1
                        if turn == 1 and count == self.switch_after:
                            break  # to the other instance, from where this one stopped
            self.reconnects += 1


async def test_the_stream_leader_killed_under_load_restarts_then_another_node_is_lost(
    nats_cluster: NatsCluster, tmp_path: Path, replicated: None
) -> None:
    api_a = ApiServer(api_settings(tmp_path, "a", nats_cluster.url))
    api_b = ApiServer(api_settings(tmp_path, "b", nats_cluster.url))
    workers = [WorkerRunner(worker_settings(nats_cluster.url, f"w{i}")) for i in range(2)]
    answers: Counter[int] = Counter()
    accepted: list[str] = []
    after_kill: list[str] = []
    killed = asyncio.Event()

    async def submitter(http: httpx.AsyncClient) -> None:
        while len(after_kill) < 10:
            response = await http.post("/api/v1/jobs", json={"type": "noop", "params": {"steps": 1}})
            answers[response.status_code] += 1
            if response.status_code == 202:
                accepted.append(response.json()["id"])
                if killed.is_set():
                    after_kill.append(response.json()["id"])
            else:
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
            await asyncio.sleep(0.05)

    async with (
        nats_client(nats_cluster.url) as (nc, js),
        serving(api_a, api_b, *workers),
        httpx.AsyncClient(base_url=api_a.url, timeout=30) as a,
        httpx.AsyncClient(base_url=api_b.url, timeout=30) as b,
    ):
        # The leader is the node API instance A is connected to: its connection goes down too.
        port = connected_port(api_a)
        victim = next(node for node in nats_cluster.nodes if node.port == port)
        await lead_from(nc, js, nats_cluster.name_of(victim))
        long_jobs = [await submit(http, params={"steps": 20, "duration_s": 4}) for http in (a, b, a, b)]
        followers = [Follower([a, b] if i % 2 == 0 else [b, a], job["id"]) for i, job in enumerate(long_jobs)]
        async with asyncio.timeout(60), asyncio.TaskGroup() as group:  # a failing task cancels the rest
            for follower in followers:
                group.create_task(follower.run())
            for http in (a, b):
                group.create_task(submitter(http))
            await asyncio.sleep(1.0)
            victim.kill()
            killed.set()
        assert await leader(js) != nats_cluster.name_of(victim)

        ids = [job["id"] for job in long_jobs] + accepted
        await completed_everywhere([a, b], ids, timeout=60)
        histories = await histories_agree([a, b], ids)
        for follower in followers:
            assert follower.seen == histories[follower.job_id], follower.job_id  # none missed, none twice
            assert follower.reconnects >= 2  # it moved to the other instance at least once
        assert set(answers) <= {202, 503}, answers

        # The killed node comes back (same store, same ports) and catches up; then another node is
        # lost, the stream's leader unless that is the one that came back, with jobs in flight.
        await victim.start()
        await replicas_current(js)
        second = nats_cluster.node(await leader(js))
        if second is victim:
            second = next(node for node in nats_cluster.nodes if node is not victim)
        in_flight = [(await submit_retrying(http, duration_s=1.0))["id"] for http in (a, b) * 3]
        second.kill()
        after = [(await submit_retrying(http))["id"] for http in (a, b) * 3]
        await completed_everywhere([a, b], in_flight + after, timeout=60)
        await histories_agree([a, b], in_flight + after)


async def submit_retrying(
    http: httpx.AsyncClient, duration_s: float = 0.0, timeout: float = 30
) -> dict[str, Any]:
    """Submit a noop job, answering a 503 (a leader election) as its Retry-After says, with the same
    client_request_id (a submission stored after all is not made twice)."""
    body = {
        "type": "noop",
        "params": {"steps": 2, "duration_s": duration_s},
        "client_request_id": str(uuid.uuid4()),
    }
    async with asyncio.timeout(timeout):
        while True:
            response = await http.post("/api/v1/jobs", json=body)
            if response.status_code in (200, 202):
                job: dict[str, Any] = msgspec.json.decode(response.content)
                return job
            assert response.status_code == 503, response.text
            await asyncio.sleep(float(response.headers["retry-after"]))
