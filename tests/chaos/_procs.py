"""Helpers of the chaos tests: `jobcast api` and `jobcast worker` as real OS processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from tests.conftest import free_port, worker_process

Event = tuple[int, str, dict[str, Any]]


class ApiProcess:
    """`python -m jobcast api` on a fixed port and data dir; its stderr goes to `log`."""

    def __init__(self, nats_url: str, data_dir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = dict(
            os.environ, JOBCAST_NATS_URL=nats_url, JOBCAST_DATA_DIR=str(data_dir), JOBCAST_SSE_PING_S="0.5",
            JOBCAST_LOG_LEVEL="WARNING",
        )  # fmt: skip
        self.env.update(env)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30) -> None:
        argv = [sys.executable, "-m", "jobcast", "api", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, env=self.env, stdout=err, stderr=err, start_new_session=True
            )
        await wait_ready(self.url, timeout, self.proc)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def close(self) -> None:
        """Always gone afterwards."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.asynccontextmanager
async def api_process(nats_url: str, tmp: Path, **env: str) -> AsyncIterator[ApiProcess]:
    """A started API subprocess, killed when the block ends."""
    api = ApiProcess(nats_url, tmp / "data", tmp / "api.log", **env)
    try:
        await api.start()
        yield api
    finally:
        await api.close()


class WorkerProcess:
    """`python -m jobcast worker --pool cpu`; SIGKILLable and restartable."""

    def __init__(self, nats_url: str, log: Path, concurrency: int = 4, **env: str) -> None:
        argv, full_env = worker_process(nats_url, "cpu", JOBCAST_LOG_LEVEL="WARNING", **env)
        self.argv: list[str] = [*argv, "--concurrency", str(concurrency)]  # type: ignore[list-item]
        self.env: dict[str, str] = full_env  # type: ignore[assignment]
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=err, stderr=err, start_new_session=True
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        if self.proc is not None:
            self.kill()
            await self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@contextlib.asynccontextmanager
async def worker_processes(
    nats_url: str, tmp: Path, count: int, concurrency: int = 4, **env: str
) -> AsyncIterator[list[WorkerProcess]]:
    """`count` started cpu workers, killed when the block ends."""
    workers = [WorkerProcess(nats_url, tmp / f"worker{i}.log", concurrency, **env) for i in range(count)]
    try:
        for w in workers:
            await w.start()
        yield workers
    finally:
        for w in workers:
            await w.close()


async def wait_ready(url: str, timeout: float = 30, proc: asyncio.subprocess.Process | None = None) -> None:
    """Poll /ready until 200 (failing early if `proc` exits)."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http, asyncio.timeout(timeout):
        while True:
            assert proc is None or proc.returncode is None, f"API exited with {proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)


async def sse_history(client: httpx.AsyncClient, job_id: str) -> list[Event]:
    """Every event of a finished job from a fresh SSE connection."""
    events: list[Event] = []
    async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events") as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            if not sse.data:
                continue  # a keep-alive comment: httpx-sse yields it as an empty event
            events.append((int(sse.id), sse.event, json.loads(sse.data)))
    return events


async def all_jobs(client: httpx.AsyncClient, **params: Any) -> tuple[int, list[dict[str, Any]]]:
    """(total, every job) of GET /api/v1/jobs, page by page."""
    items: list[dict[str, Any]] = []
    total = -1
    for _ in range(1000):  # bounded: 500 000 jobs
        response = await client.get("/api/v1/jobs", params={**params, "limit": 500, "offset": len(items)})
        assert response.status_code == 200, response.text
        page = response.json()
        total = page["total"]
        items += page["items"]
        if not page["items"] or len(items) >= total:
            break
    return total, items


async def count(client: httpx.AsyncClient, **params: Any) -> int:
    """`total` of GET /api/v1/jobs with these filters."""
    response = await client.get("/api/v1/jobs", params={**params, "limit": 1})
    assert response.status_code == 200, response.text
    total: int = response.json()["total"]
    return total


async def wait_all_completed(client: httpx.AsyncClient, expected: int, timeout: float) -> None:
    """Return once `expected` jobs exist and none is active (the caller checks the statuses)."""
    async with asyncio.timeout(timeout):
        while await count(client) < expected or await count(client, active="true") > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
