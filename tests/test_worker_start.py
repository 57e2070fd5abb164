"""A worker that starts while JetStream is not there yet keeps declaring its stream and consumers,
with a growing pause, and runs once it is; asked to stop meanwhile, it stops."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats.errors
import pytest

from streams import NatsServer, nats_server_binary
from tests.conftest import WorkerRunner, free_port
from workers import Worker, WorkerSettings


@asynccontextmanager
async def core_only_server(port: int) -> AsyncIterator[None]:
    """A real nats-server without JetStream: clients connect, every JetStream request goes unanswered."""
    process = await asyncio.create_subprocess_exec(
        nats_server_binary(), "-a", "127.0.0.1", "-p", str(port),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            break
        yield
    finally:
        process.terminate()
        await process.wait()


def retry_pauses(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The pauses the worker announced between its tries to declare the stream and consumers."""
    found = [re.search(r"retrying in ([\d.]+) s", r.getMessage()) for r in caplog.records]
    return [float(m.group(1)) for m in found if m is not None and "declaring the stream" in m.string]


async def wait_pauses(caplog: pytest.LogCaptureFixture, count: int, timeout: float = 20) -> list[float]:
    """Poll the log until the worker announced `count` pauses."""
    async with asyncio.timeout(timeout):
        while len(retry_pauses(caplog)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return retry_pauses(caplog)


@pytest.mark.slow
async def test_worker_declares_once_jetstream_is_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="jobcast.worker")
    port = free_port()
    settings = WorkerSettings(pool="cpu", nats_url=f"nats://127.0.0.1:{port}", name="early")
    runner = WorkerRunner(settings)
    async with core_only_server(port):
        task = asyncio.create_task(runner.worker.run())
        pauses = await wait_pauses(caplog, 3)
        assert pauses[:3] == [0.2, 0.4, 0.8]  # doubling from 0.2 s (capped at 5 s)
        assert not runner.worker.ready.is_set()
    server = NatsServer(tmp_path / "nats", port=port, die_with_parent=True)
    await server.start()
    try:
        async with asyncio.timeout(30):
            await runner.worker.ready.wait()  # the worker reconnected and declared its consumers
        runner.task = task
        await runner.stop()
        assert task.done()
        assert task.exception() is None
    finally:
        await server.stop()


async def test_a_stop_ends_the_declare_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="jobcast.worker")
    port = free_port()
    worker = Worker(WorkerSettings(pool="cpu", nats_url=f"nats://127.0.0.1:{port}", name="stopped"))
    async with core_only_server(port):
        task = asyncio.create_task(worker.run())
        await wait_pauses(caplog, 1)
        worker.request_stop()
        async with asyncio.timeout(30):
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await task
    assert not worker.ready.is_set()
