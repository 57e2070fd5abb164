"""Fixtures: a real nats-server per test, the real API over HTTP, real workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Litestar

from app import Settings, create_app
from streams import NatsServer
from workers import Worker, WorkerSettings

REPO = Path(__file__).resolve().parent.parent
MEDIA = REPO.parent / "shared" / "media"
TERMINAL = {"completed", "failed", "cancelled"}


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ApiServer:
    """The real Litestar app under uvicorn, in this event loop, on a fixed free port; restartable."""

    def __init__(self, settings: Settings, send_buffer: int | None = None) -> None:
        self.settings = settings
        self.send_buffer = send_buffer
        """SO_SNDBUF of the connections (None: the kernel's, which grows to megabytes on loopback)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: socket.socket | None = None
        self.app: Litestar | None = None
        """The app being served (its state holds the job queries, commands, live part and the projection)."""

    async def start(self) -> None:
        """Serve until `stop`; returns once the app's lifespan has started."""
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, lifespan="on",
            log_level="warning", timeout_graceful_shutdown=1, ws="websockets-sansio",
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        sockets = None
        if self.send_buffer is not None:  # accepted connections inherit the listener's buffer size
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
            listener.bind(("127.0.0.1", self.port))
            self._listener = listener
            sockets = [listener]
        self._task = asyncio.create_task(self._server.serve(sockets))
        # Generous: a start on a cluster raises replicas and may ride out JetStream for a while.
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            if self._server.started:
                return
            if self._task.done():
                self._task.result()
                raise RuntimeError("uvicorn exited during start-up")
            await asyncio.sleep(0.01)
        raise RuntimeError("API did not start in 30 s")

    async def stop(self) -> None:
        """Graceful stop, as SIGTERM would do."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 15)
            self._server = self._task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def idle(self, timeout: float = 10) -> None:
        """Until uvicorn handles no request: a stream whose client went away has then released
        what it held (its quota slot, its subscriptions)."""
        assert self._server is not None
        async with asyncio.timeout(timeout):
            while self._server.server_state.tasks:  # noqa: ASYNC110 - uvicorn signals no end
                await asyncio.sleep(0.01)


class WorkerRunner:
    """A worker of one pool running as a task in this loop."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.worker = Worker(settings)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Run until `stop`; returns once it fetches."""
        self.task = asyncio.create_task(self.worker.run())
        ready = asyncio.create_task(self.worker.ready.wait())
        await asyncio.wait({self.task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()
        assert self.worker.ready.is_set(), "worker did not start"

    async def stop(self) -> None:
        """Graceful stop (what SIGTERM does)."""
        if self.task is not None and not self.task.done():
            self.worker.request_stop()
            await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh `nats-server -js` on a free port with its own store."""
    server = NatsServer(tmp_path / "nats", die_with_parent=True)  # a killed pytest leaves no server
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_server: NatsServer) -> Settings:
    """API settings pointing at this test's NATS and a fresh SQLite file."""
    return Settings(data_dir=tmp_path / "data", nats_url=nats_server.url, sse_ping_s=0.5, submit_timeout_s=10)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[ApiServer]:
    """The API over real HTTP."""
    server = ApiServer(settings)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def worker_settings(nats_server: NatsServer) -> WorkerSettings:
    """Settings of a cpu worker with short timers so redelivery tests finish quickly."""
    return WorkerSettings(
        pool="cpu",
        nats_url=nats_server.url,
        ack_wait_s=2.0,
        grace_s=2.0,
        retry_base_s=0.2,
        name="test-worker",
    )


@pytest.fixture
async def worker(worker_settings: WorkerSettings) -> AsyncIterator[WorkerRunner]:
    """One in-process cpu worker."""
    runner = WorkerRunner(worker_settings)
    await runner.start()
    yield runner
    await runner.stop()


@pytest.fixture
async def gpu(worker_settings: WorkerSettings) -> AsyncIterator[WorkerRunner]:
    """A worker of the gpu pool (transcribe, generate_srt); whisper runs on the CPU here."""
    runner = WorkerRunner(replace(worker_settings, pool="gpu", ack_wait_s=5, name="gpu"))
    await runner.start()
    yield runner
    await runner.stop()


@pytest.fixture
async def client(api: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the API."""
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        yield http


async def submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    """POST a job and check the 202."""
    body.setdefault("type", "noop")
    response = await client.post("/api/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def wait_terminal(client: httpx.AsyncClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """Long-poll until the job is terminal."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/api/v1/jobs/{job_id}/poll", params={"timeout": 5})
            assert response.status_code == 200, response.text
            job: dict[str, Any] = response.json()
            if job["status"] in TERMINAL:
                return job


def worker_process(nats_url: str, pool: str = "cpu", **env: str) -> list[str | dict[str, str]]:
    """argv and env of a `jobcast worker` subprocess."""
    full_env = dict(os.environ, JOBCAST_NATS_URL=nats_url, JOBCAST_ACK_WAIT_S="2", JOBCAST_WORKER_GRACE_S="2")
    full_env.update(env)
    return [[sys.executable, "-m", "jobcast", "worker", "--pool", pool], full_env]


@contextlib.asynccontextmanager
async def spawned(argv: list[str], env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process that is always gone when the block ends."""
    proc = await asyncio.create_subprocess_exec(*argv, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


__all__ = ["MEDIA", "REPO", "TERMINAL", "ApiServer", "WorkerRunner", "free_port", "replace", "spawned",
           "submit", "wait_terminal", "worker_process"]  # fmt: skip
