"""P2: noop jobs/s from 32 concurrent connections and through the batch endpoint, vs Celery + Redis."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.harness import (
    Child,
    Http,
    apt_install,
    free_port,
    nats_cpu,
    nats_server,
    scaled,
    self_cpu_seconds,
    start_api,
    start_worker,
    table,
    wait_workers,
    write_json,
)

JOBS = scaled(10_000, 2_000)
CONNECTIONS = 32
BATCH = 1_000
"""Items per batch request; JOBS / BATCH requests go out at once."""
WORKER_SLOTS = 64
"""Noop jobs a jobcast worker runs at once (they only publish events)."""
CELERY_PROCS = 2
"""Celery prefork children: one per core."""
TARGET_RATIO = {"32 connections": 2.0, "batch": 4.0}
"""jobs/s as a multiple of Celery's in the same run, by mode (issue 20)."""
LIMIT_S = 300

JOB = msgspec.json.encode({"type": "noop", "params": {"steps": 0}})


async def _submit_singles(url: str, path: str, body: bytes, count: int) -> int:
    """`count` POSTs spread over CONNECTIONS keep-alive connections; returns the non-2xx count."""
    remaining = count
    errors = 0

    async def one_connection() -> None:
        nonlocal remaining, errors
        conn = await Http.open(url)
        try:
            while remaining > 0:
                remaining -= 1
                status, _ = await conn.request("POST", path, body)
                errors += not 200 <= status < 300
        finally:
            conn.close()

    await asyncio.gather(*(one_connection() for _ in range(CONNECTIONS)))
    return errors


async def _submit_batches(url: str, path: str, body: Callable[[int], bytes], count: int) -> int:
    """count / BATCH batch requests at once, each on its own connection."""
    sizes = [min(BATCH, count - start) for start in range(0, count, BATCH)]

    async def one(size: int) -> int:
        conn = await Http.open(url)
        try:
            status, _ = await conn.request("POST", path, body(size))
            return int(not 200 <= status < 300)
        finally:
            conn.close()

    return sum(await asyncio.gather(*(one(size) for size in sizes)))


async def _until(done: Callable[[], Awaitable[int]], count: int) -> float:
    """Poll until `done()` reaches `count`; the moment it did."""
    deadline = time.monotonic() + LIMIT_S
    while (finished := await done()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {finished} of {count} jobs finished within {LIMIT_S} s")
        await asyncio.sleep(0.05)
    return time.perf_counter()


async def _measure(
    submit: Awaitable[int], done: Callable[[], Awaitable[int]], children: list[Child], nats: Any = None
) -> dict[str, Any]:
    cpu_before = [c.cpu() for c in children] + [nats_cpu(nats) if nats else 0.0, self_cpu_seconds()]
    began = time.perf_counter()
    errors = await submit
    submitted = time.perf_counter()
    finished = await _until(done, JOBS)
    cpu_after = [c.cpu() for c in children] + [nats_cpu(nats) if nats else 0.0, self_cpu_seconds()]
    names = [c.name for c in children] + ["nats", "client"]
    cpu = {n: round(b - a, 2) for n, a, b in zip(names, cpu_before, cpu_after, strict=True) if b - a > 0}
    return {
        "jobs_per_s": round(JOBS / (finished - began), 1),
        "submits_per_s": round(JOBS / (submitted - began), 1),
        "seconds": round(finished - began, 2),
        "errors": errors,
        "cpu_s": cpu,
    }


async def _jobcast(batch: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with nats_server(Path(tmp)) as nats:
            api, url = await start_api(nats.url, Path(tmp) / "data")
            worker = start_worker(nats.url, Path(tmp) / "data", concurrency=WORKER_SLOTS)
            try:
                await wait_workers(nats.url, 1)
                probe = await Http.open(url)
                query = "/api/v1/jobs?status=completed&type=noop&include_children=true&limit=1"

                async def done() -> int:
                    status, body = await probe.request("GET", query)
                    return int(msgspec.json.decode(body)["total"]) if status == 200 else 0

                if batch:
                    items = msgspec.json.encode
                    submit = _submit_batches(
                        url, "/api/v1/jobs/batch",
                        lambda n: items({"type": "noop", "params": {"steps": 0}, "items": [{}] * n}), JOBS,
                    )  # fmt: skip
                else:
                    submit = _submit_singles(url, "/api/v1/jobs", JOB, JOBS)
                result = await _measure(submit, done, [api, worker], nats)
                probe.close()
                return result
            finally:
                worker.stop()
                api.stop()


async def _celery(batch: bool) -> dict[str, Any]:
    import redis

    redis_server = apt_install("redis-server", "redis-server")
    port = free_port()
    broker = Child("redis", [redis_server, "--port", str(port), "--save", "", "--appendonly", "no"])
    env = {"BENCH_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            await asyncio.sleep(0.05)
    http_port = free_port()
    web = Child(
        "http",
        [sys.executable, "-m", "uvicorn", "bench.celery_app:app", "--port", str(http_port), "--log-level",
         "warning", "--no-access-log"],
        env,
    )  # fmt: skip
    worker = Child(
        "celery",
        [sys.executable, "-m", "celery", "-A", "bench.celery_app:celery", "worker", "--pool", "prefork",
         "--concurrency", str(CELERY_PROCS), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http_port}"
        for _ in range(200):
            try:
                (await Http.open(url)).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        script = client.register_script("return #redis.call('keys', 'celery-task-meta-*')")

        async def done() -> int:
            # Results land in the backend once a task ran: that is Celery's "completed".
            return int(await asyncio.to_thread(script))

        if batch:
            submit = _submit_batches(
                url, "/jobs/batch", lambda n: msgspec.json.encode({"items": [{}] * n}), JOBS
            )
        else:
            submit = _submit_singles(url, "/jobs", b"{}", JOBS)
        # A prefork worker's CPU is its pool children's: count the whole process group.
        return await _measure(submit, done, [web, _Group(worker), broker])
    finally:
        worker.stop()
        web.stop()
        broker.stop()


class _Group:
    """The CPU time of a process and its live children (Celery's prefork pool)."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.name = child.name

    def cpu(self) -> float:
        import psutil

        try:
            proc = psutil.Process(self.child.pid)
            total = sum(proc.cpu_times()[:2])
            for kid in proc.children(recursive=True):
                total += sum(kid.cpu_times()[:2])
            return total
        except psutil.Error:
            return 0.0


async def run() -> dict[str, Any]:
    """Each mode for Celery, then for jobcast."""
    modes: dict[str, dict[str, Any]] = {}
    for batch in (False, True):
        mode = "batch" if batch else f"{CONNECTIONS} connections"
        modes[f"celery, {mode}"] = await _celery(batch)
        modes[f"jobcast, {mode}"] = await _jobcast(batch)
    rows = []
    verdicts = {}
    for batch in (False, True):
        mode = "batch" if batch else f"{CONNECTIONS} connections"
        base, ours = modes[f"celery, {mode}"], modes[f"jobcast, {mode}"]
        ratio = ours["jobs_per_s"] / base["jobs_per_s"]
        met = ratio >= TARGET_RATIO[mode]
        verdicts[mode] = {"ratio": round(ratio, 2), "met": met}
        for name, figures in ((f"celery, {mode}", base), (f"jobcast, {mode}", ours)):
            is_ours = figures is ours
            rows.append([
                name, figures["jobs_per_s"], figures["submits_per_s"], figures["errors"],
                " ".join(f"{k}={v}" for k, v in figures["cpu_s"].items()),
                f"{ratio:.2f}x" if is_ours else "1.00x",
                f">= {TARGET_RATIO[mode]:.0f}x" if is_ours else "", ("met" if met else "not met") if is_ours else "",
            ])  # fmt: skip
    table(
        f"P2 throughput: {JOBS:,} noop jobs until all completed",
        ["", "jobs/s", "submits/s", "errors", "CPU s by process", "vs celery", "target", "result"],
        rows,
    )
    result = {"jobs": JOBS, "connections": CONNECTIONS, "batch_size": BATCH, "worker_slots": WORKER_SLOTS,
              "celery_processes": CELERY_PROCS, "modes": modes, "verdicts": verdicts}  # fmt: skip
    write_json("throughput", result)
    return result


if __name__ == "__main__":
    asyncio.run(run())
