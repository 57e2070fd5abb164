"""Where the API's CPU goes per job: P1's run with py-spy sampling the API, each sample given to
one hop (HTTP parse, auth, validation, publish, projection, SQLite write, hub, SSE write...).

`python -m bench profile` (py-spy comes with the `bench` extra). py-spy samples the thread that
holds the GIL (`--gil`): an event loop waiting in epoll is not counted, uvloop's own C work is
(under the loop's frame), and SQLite's C work without the GIL is not. A sample is given to the
innermost frame of its stack that names a hop, so a hop's share excludes the hops it calls; the
shares times the API's measured CPU per job give milliseconds per hop.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import dispatch
from bench.harness import table, write_json

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
IDLE = ("_connection_worker_thread (aiosqlite/core.py:59)", "_worker (concurrent/futures/thread.py")
"""Leaf frames of threads that wait for work: py-spy may count a timed wait as running."""


def classify(stack: list[str]) -> str | None:
    """The hop a sample (outermost frame first) belongs to; None for an idle thread's wait."""
    if stack and stack[-1].startswith(IDLE):
        return None
    for frame in reversed(stack):
        for hop, markers in HOPS:
            if any(
                marker in frame if marker.startswith("(") else frame.startswith(marker) for marker in markers
            ):
                return hop
    return "other"


def hops(raw: Path) -> Counter[str]:
    """Samples per hop of a py-spy raw (collapsed) profile."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        hop = classify(stack.split(";"))
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


async def run() -> dict[str, Any]:
    """P1 with the API under py-spy; the per-hop table."""
    spy_bin = py_spy()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "api.txt"
        spies: list[asyncio.subprocess.Process] = []
        start_api = dispatch.start_api

        async def profiled_api(*args: Any, **kwargs: Any) -> Any:
            child, url = await start_api(*args, **kwargs)
            spies.append(await asyncio.create_subprocess_exec(
                spy_bin, "record", "--gil", "-r", str(RATE_HZ), "-f", "raw", "-o", str(raw), "--pid", str(child.pid),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            ))  # fmt: skip
            return child, url

        dispatch.start_api = profiled_api  # type: ignore[assignment]
        try:
            p1 = await dispatch.measure()  # not recorded as P1: py-spy slows the API
        finally:
            dispatch.start_api = start_api
            for spy in spies:  # the API is gone: py-spy writes its file and exits
                if spy.returncode is None:
                    spy.send_signal(signal.SIGINT)
                await asyncio.wait_for(spy.wait(), 30)
        counts = hops(raw)
    total = sum(counts.values())
    api_ms = p1["cpu_ms_per_pair"]["api"]
    rows = [[hop, f"{100 * n / total:.1f}", f"{api_ms * n / total:.3f}"] for hop, n in counts.most_common()]
    table(f"API CPU per job pair by hop ({api_ms} ms in all, {total} samples)", ["hop", "%", "ms"], rows)
    result = {"api_ms_per_job": api_ms, "samples": total, "hops": dict(counts.most_common())}
    write_json("profile", result)
    return result
