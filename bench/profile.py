"""Where the API's CPU goes per job: P1's jobs with py-spy sampling the API, each sample given to
one hop (HTTP parse, auth, validation, publish, projection, SQLite write, hub, SSE write...), then
P1's floor (the same two requests for the finished jobs) profiled apart.

`python -m bench profile` (py-spy comes with the `bench` extra). py-spy samples the thread that
holds the GIL (`--gil`): an event loop waiting in epoll is not counted, uvloop's own C work is
(under the loop's frame, with the system calls it makes), and SQLite's C work without the GIL is
not. A sample is given to the innermost frame of its stack that names a hop, so a hop's share
excludes the hops it calls; a phase's shares times the API's CPU per job in it (measured while
py-spy samples, so a little above P1's) give milliseconds per hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench import dispatch
from bench.harness import Http, nats_server, start_api, start_worker, table, wait_workers, write_json

RATE_HZ = 250
HOPS: list[tuple[str, tuple[str, ...]]] = [
    # (hop, frame markers: "function (file" prefixes, matched from the innermost frame outwards)
    ("SSE write (to uvicorn)", ("SseFollower._write ",)),
    ("SSE history read", ("Replay.page ", "JobQueries.history ", "JobQueries._history_now ")),
    ("job read (visibility, idempotency key)", ("JobQueries.",)),
    ("hub fan-out", ("Hub.", "SseFollower.deliver ")),
    ("projection: SQLite write", ("BatchWrites.flush ",)),
    ("projection: job rows read", ("BatchWrites.load ",)),
    ("projection: fold and envelope", ("write_batch ", "fold ", "_envelope ")),
    ("projection: receive and queue", ("Projection.",)),
    ("publish to JetStream", ("Publisher.",)),
    ("read-your-writes check", ("Freshness", "FreshnessMiddleware.handle ")),
    ("submit handler", ("JobCommands.", "JobController.")),
    ("SSE handler", ("LiveController.", "_FollowResponse.", "SseFollower.", "FollowEvents.")),
    ("auth", ("AuthMiddleware.", "Keys.")),
    ("rate limit, query check", ("RateLimit.", "QueryCheck.")),
    ("validation (params, body)", ("validate_params ", "parse_params ", "SignatureModel.", "KwargsModel.")),
    ("Litestar routing, middleware, responses", ("(litestar/",)),
    ("HTTP (uvicorn, httptools)", ("(uvicorn/", "(httptools")),
    ("NATS client", ("(nats/",)),
    ("asyncio event loop", ("(asyncio/", "(uvloop")),
]
WORKER_HOPS: list[tuple[str, tuple[str, ...]]] = [
    ("publish started, completed", ("Events.publish", "Events.record ", "Events._publish_once ")),
    ("prechecks (cancel request, last event)", ("AttemptRunner._precheck ", "Events.last ")),
    ("fetch (pull requests)", ("Fetcher.",)),
    ("claim and release the running subject", ("RunningJob.claim ", "RunningJob.unclaim ")),
    ("heartbeat", ("Heartbeat.",)),
    ("run: context, handler, ack", ("AttemptRunner.", "RunningJob.", "JobContext.", "Worker.")),
]
"""The worker's hops, for P2's profile: each sample goes to the innermost of the worker's own frames
(the nats-py and asyncio work under it included); samples under none of them, to FALLBACK_HOPS."""
FALLBACK_HOPS = [("NATS client (read loop)", ("(nats/",)), ("asyncio event loop", ("(asyncio/", "(uvloop"))]
IDLE = ("_connection_worker_thread (aiosqlite/core.py:59)", "_worker (concurrent/futures/thread.py")
"""Leaf frames of threads that wait for work: py-spy may count a timed wait as running."""


def classify(stack: list[str], table: list[tuple[str, tuple[str, ...]]] = HOPS) -> str | None:
    """The hop a sample (outermost frame first) belongs to; None for an idle thread's wait."""
    if stack and stack[-1].startswith(IDLE):
        return None
    for frame in reversed(stack):
        for hop, markers in table:
            if any(
                marker in frame if marker.startswith("(") else frame.startswith(marker) for marker in markers
            ):
                return hop
    return "other"


def hops(raw: Path, table: list[tuple[str, tuple[str, ...]]] = HOPS) -> Counter[str]:
    """Samples per hop of a py-spy raw (collapsed) profile."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        hop = classify(stack.split(";"), table)
        if hop == "other" and table is WORKER_HOPS:
            hop = classify(stack.split(";"), FALLBACK_HOPS)
        if hop is not None:
            counts[hop] += int(count)
    return counts


def py_spy() -> str:
    """The py-spy binary (the bench extra's, beside this Python, or on PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


async def _spied(pid: int, raw: Path) -> asyncio.subprocess.Process:
    spy = await asyncio.create_subprocess_exec(
        py_spy(), "record", "--gil", "-r", str(RATE_HZ), "-f", "raw", "-o", str(raw), "--pid", str(pid),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # py-spy attaches
    return spy


async def _stopped(spy: asyncio.subprocess.Process) -> None:
    if spy.returncode is None:  # else its process is gone, and py-spy has written its file
        with contextlib.suppress(ProcessLookupError):
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
    await asyncio.wait_for(spy.wait(), 30)


def _by_hop(counts: Counter[str], ms: float) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {hop: round(ms * n / total, 3) for hop, n in counts.most_common()}


async def _p2() -> dict[str, Any]:
    """P2's jobcast run through 32 connections with py-spy on the API and on the worker while it
    is measured; each process's CPU per job by hop."""
    from bench import throughput

    spies: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}
    real_measure = throughput._measure
    with tempfile.TemporaryDirectory() as tmp:

        async def measured(submit: Any, done: Any, children: list[Any], nats: Any = None) -> dict[str, Any]:
            for child in children:  # the API and the worker
                raw = Path(tmp) / f"{child.name}.txt"
                spies[child.name] = (await _spied(child.pid, raw), raw)
            try:
                return await real_measure(submit, done, children, nats)
            finally:
                for spy, _ in spies.values():
                    with contextlib.suppress(Exception):
                        await _stopped(spy)

        throughput._measure = measured  # type: ignore[assignment]
        try:
            figures = await throughput._jobcast(batch=False)
        finally:
            throughput._measure = real_measure
        cpu_ms = {
            name: round(seconds / throughput.JOBS * 1000, 3) for name, seconds in figures["cpu_s"].items()
        }
        result: dict[str, Any] = {"jobs_per_s": figures["jobs_per_s"], "cpu_ms_per_job": cpu_ms}
        for name, (_, raw) in spies.items():
            hop_table = HOPS if name == "api" else WORKER_HOPS
            result[f"{name}_hops_ms"] = by_hop = _by_hop(hops(raw, hop_table), cpu_ms[name])
            rows = [[hop, f"{value:.3f}"] for hop, value in by_hop.items()]
            title = f"P2, 32 connections: {name} CPU per job by hop ({cpu_ms[name]:.3f} ms, under py-spy)"
            table(title, ["hop", "ms"], rows)
    return result


async def run() -> dict[str, Any]:
    """P1's two phases under py-spy, each on its own: jobs (a POST answered 202 and an SSE follow to
    the job's end), then the same two requests again for the finished jobs (the floor); then P2's
    32-connection run with the API and the worker under py-spy."""
    py_spy()  # fail before starting anything when it is missing
    cpu: dict[str, float] = {}
    counts: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with nats_server(folder) as nats:
            api, url = await start_api(nats.url, folder / "data")
            worker = start_worker(nats.url, folder / "data")
            try:
                await wait_workers(nats.url, 1)
                conn = await Http.open(url)
                for _ in range(dispatch.WARMUP):
                    key = str(uuid.uuid4())
                    await dispatch.submit_and_follow(conn, key)
                    await dispatch.submit_and_follow(conn, key)
                keys = [str(uuid.uuid4()) for _ in range(dispatch.JOBS)]
                for phase in ("job", "floor"):
                    raw = folder / f"{phase}.txt"
                    spy = await _spied(api.pid, raw)
                    began = api.cpu()
                    for key in keys:
                        await dispatch.submit_and_follow(conn, key)
                    cpu[phase] = (api.cpu() - began) / len(keys) * 1000
                    await _stopped(spy)
                    counts[phase] = hops(raw)
                conn.close()
            finally:
                worker.stop()
                api.stop()
    shares = {phase: {hop: n / sum(c.values()) for hop, n in c.items()} for phase, c in counts.items()}
    ordered = sorted(set(shares["job"]) | set(shares["floor"]), key=lambda h: -shares["job"].get(h, 0.0))
    rows = [
        [
            hop,
            f"{cpu['job'] * shares['job'].get(hop, 0.0):.3f}",
            f"{cpu['floor'] * shares['floor'].get(hop, 0.0):.3f}",
        ]
        for hop in ordered
    ]
    rows.append(["all (under py-spy)", f"{cpu['job']:.3f}", f"{cpu['floor']:.3f}"])
    table("API CPU by hop (ms): a job, and the floor's two requests", ["hop", "job", "floor"], rows)
    result = {
        "p2": await _p2(),
        "api_ms": {phase: round(ms, 3) for phase, ms in cpu.items()},
        "hops_ms": {phase: {hop: round(cpu[phase] * share, 3) for hop, share in shares[phase].items()} for phase in shares},
        "samples": {phase: sum(c.values()) for phase, c in counts.items()},
    }  # fmt: skip
    write_json("profile", result)
    return result
