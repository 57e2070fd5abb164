"""P7: a local 3-node JetStream cluster (every stream R3) beside one node (R1), in the same run.

For each: noop jobs/s through one `jobcast api` and one `jobcast worker`; then, with a client
submitting a job every SUBMIT_EVERY_S and SSE followers on long jobs, a kill -9 of the node
that leads the JOBS stream (one node: kill -9 and restart it at once, as `jobcast serve` does):
the failover gap (from the kill to the first submit accepted again) and the longest any
follower waited for its next event. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.harness import Child, Http, scaled, start_api, start_worker, table, wait_workers, write_json
from bench.throughput import _submit_singles

JOBS = scaled(2_000, 500)
WORKER_SLOTS = 64
FOLLOWERS = 8
FOLLOWED_JOB = msgspec.json.encode({"type": "noop", "params": {"steps": 40, "duration_s": 8}})
"""An event every 0.2 s for 8 s: a follower's longest wait shows the failover's."""
SUBMIT_EVERY_S = 0.02
KILL_AFTER_S = 2.0
AFTER_KILL = 20
"""Submissions accepted after the kill before the submitter stops."""
LIMIT_S = 90
NOOP = msgspec.json.encode({"type": "noop", "params": {"steps": 0}})
_ID = re.compile(rb"^id: (\d+)", re.MULTILINE)
_END = re.compile(rb"^event: (completed|failed|cancelled)", re.MULTILINE)


class Topology:
    """One node or the cluster: its URL, how to kill the node that leads JOBS, and what else
    the API and worker need (the replicas)."""

    def __init__(
        self, name: str, url: str, env: dict[str, str], kill: Callable[[Callable[[], None]], Awaitable[float]]
    ):
        self.name, self.url, self.env, self.kill = name, url, env, kill
        """`kill(mark)` calls `mark()` as it sends the SIGKILL, and returns the seconds until JOBS had a
        leader again (one node: until it had restarted)."""


@contextlib.asynccontextmanager
async def single(tmp: Path) -> AsyncIterator[Topology]:
    """One nats-server; its "failover" is a kill -9 and an immediate restart on the same store."""
    from streams import NatsServer

    server = NatsServer(tmp / "nats", die_with_parent=True)
    await server.start()

    async def kill(mark: Callable[[], None]) -> float:
        began = time.perf_counter()
        mark()
        server.kill()
        assert server.process is not None
        await server.process.wait()
        await server.start()
        return time.perf_counter() - began

    try:
        yield Topology("one node (R1)", server.url, {}, kill)
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[Topology]:
    """Three nodes with routes between them; the kill takes the JOBS stream's leader."""
    from streams import STREAM, close_quietly, connect
    from tests.cluster import running_cluster

    async with running_cluster(tmp / "cluster") as nodes:

        async def kill(mark: Callable[[], None]) -> float:
            nc = await connect(nodes.url, name="bench")
            try:
                js = nc.jetstream(timeout=1)
                info = await js.stream_info(STREAM)
                assert info.cluster is not None
                old = info.cluster.leader
                assert old
                began = time.perf_counter()
                mark()
                nodes.node(old).kill()
                while True:  # until the stream has elected a new leader
                    with contextlib.suppress(Exception):
                        info = await js.stream_info(STREAM)
                        if info.cluster is not None and info.cluster.leader not in (None, old):
                            return time.perf_counter() - began
                    await asyncio.sleep(0.05)
            finally:
                await close_quietly(nc)

        yield Topology("3-node cluster (R3)", nodes.url, {"JOBCAST_STREAM_REPLICAS": "3"}, kill)


async def throughput(url: str) -> float:
    """noop jobs/s: JOBS submitted over 32 connections, until the last is completed."""
    probe = await Http.open(url)
    query = "/api/v1/jobs?status=completed&type=noop&limit=1"
    began = time.perf_counter()
    errors = await _submit_singles(url, "/api/v1/jobs", NOOP, JOBS)
    deadline = time.monotonic() + LIMIT_S
    while True:
        status, body = await probe.request("GET", query)
        if status == 200 and msgspec.json.decode(body)["total"] >= JOBS:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{JOBS} jobs did not complete within {LIMIT_S} s")
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - began
    probe.close()
    if errors:
        raise RuntimeError(f"{errors} submissions failed")
    return JOBS / elapsed


async def follow(url: str, job_id: str) -> float:
    """Follow a job's SSE stream to its end (reconnecting with Last-Event-ID if it breaks); the
    longest wait between two of its events, in seconds."""
    longest, last_at, last_id = 0.0, time.perf_counter(), 0
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        try:
            conn = await Http.open(url)
            try:
                conn.send("GET", f"/api/v1/jobs/{job_id}/events", headers=f"Last-Event-ID: {last_id}\r\n")
                _, head = await conn.head()
                async for chunk in conn.chunks(head):
                    ids = _ID.findall(chunk)
                    if ids:
                        now = time.perf_counter()
                        longest, last_at, last_id = max(longest, now - last_at), now, int(ids[-1])
                    if _END.search(chunk):
                        return longest
            finally:
                conn.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await asyncio.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not end within {LIMIT_S} s")


async def failover(topology: Topology, url: str) -> dict[str, Any]:
    """Kill the node leading JOBS under a steady trickle of submissions and SSE followers."""
    conn = await Http.open(url)
    ids = []
    for _ in range(FOLLOWERS):
        status, body = await conn.request("POST", "/api/v1/jobs", FOLLOWED_JOB)
        assert status == 202, body
        ids.append(msgspec.json.decode(body)["id"])
    followers = [asyncio.create_task(follow(url, job_id)) for job_id in ids]
    answers: dict[int, int] = {}
    accepted_after: list[float] = []
    killed_at: float | None = None

    async def submitter() -> None:
        while len(accepted_after) < AFTER_KILL:
            sent = time.perf_counter()
            status, _ = await conn.request("POST", "/api/v1/jobs", NOOP)
            answers[status] = answers.get(status, 0) + 1
            if status == 202 and killed_at is not None and sent > killed_at:  # sent after the kill
                accepted_after.append(time.perf_counter())
            await asyncio.sleep(SUBMIT_EVERY_S)

    submitting = asyncio.create_task(submitter())
    await asyncio.sleep(KILL_AFTER_S)

    def mark() -> None:
        nonlocal killed_at
        killed_at = time.perf_counter()

    async with asyncio.timeout(LIMIT_S):
        back_after = await topology.kill(mark)
        await submitting
        waits = await asyncio.gather(*followers)
    conn.close()
    return {
        "leader_back_s": round(back_after, 2),
        "failover_gap_s": round(accepted_after[0] - killed_at, 2),
        "longest_follower_wait_s": round(max(waits), 2),
        "answers": answers,
    }


async def measure(make: Callable[[Path], contextlib.AbstractAsyncContextManager[Topology]]) -> dict[str, Any]:
    """Both figures for one topology, with its own API and worker."""
    with tempfile.TemporaryDirectory() as tmp:
        async with make(Path(tmp)) as topology:
            children: list[Child] = []
            try:
                api, url = await start_api(topology.url, Path(tmp) / "data", **topology.env)
                children.append(api)
                children.append(
                    start_worker(topology.url, Path(tmp) / "data", concurrency=WORKER_SLOTS, **topology.env)
                )
                await wait_workers(topology.url.split(",")[0], 1)
                rate = await throughput(url)
                return {"name": topology.name, "jobs_per_s": round(rate, 1), **await failover(topology, url)}
            finally:
                for child in children:
                    child.stop()


async def run() -> dict[str, Any]:
    """One node first, then the cluster."""
    base = await measure(single)
    ours = await measure(cluster)
    rows = [
        [each["name"], each["jobs_per_s"], f"{each['jobs_per_s'] / base['jobs_per_s']:.2f}x",
         each["leader_back_s"], each["failover_gap_s"], each["longest_follower_wait_s"],
         " ".join(f"{code}: {n}" for code, n in sorted(each["answers"].items()))]
        for each in (base, ours)
    ]  # fmt: skip
    table(
        f"P7 cluster: {JOBS:,} noop jobs; then the JOBS leader killed under {FOLLOWERS} SSE followers",
        [
            "",
            "jobs/s",
            "vs one node",
            "JOBS led again s",
            "failover gap s",
            "longest follower wait s",
            "submit answers",
        ],
        rows,
    )
    result = {"jobs": JOBS, "followers": FOLLOWERS, "one_node": base, "cluster": ours}
    write_json("cluster", result)
    return result


if __name__ == "__main__":
    asyncio.run(run())
