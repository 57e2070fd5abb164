"""`jobcast serve`: one process tree for one machine.

Starts an embedded nats-server, one API and one worker per pool as child processes,
restarts whatever dies (a crashing worker never takes the API down), and on Ctrl-C /
SIGTERM stops them in order: API and workers first, then NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from streams import NatsServer, Pool

log = logging.getLogger("jobcast.serve")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0
"""A child that ran this long is healthy again: its restart backoff resets."""


@dataclass
class Child:
    """A supervised child process."""

    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = RESTART_MIN_S
    restarts: int = field(default=0)

    async def start(self, env: dict[str, str]) -> None:
        """Start (or restart) the process in its own session, so Ctrl-C reaches only the supervisor."""
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, grace)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class Supervisor:
    """Runs NATS, the API and the workers until asked to stop."""

    def __init__(self, data_dir: Path, host: str, port: int, nats_port: int, pools: list[str]) -> None:
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port
        self.nats = NatsServer(self.data_dir / "nats", port=nats_port)
        me = [sys.executable, "-m", "jobcast"]
        self.children = [Child("api", [*me, "api", "--host", host, "--port", str(port)])]
        self.children += [Child(f"worker-{pool}", [*me, "worker", "--pool", pool]) for pool in pools]
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        """Begin an orderly shutdown."""
        self._stop.set()

    async def run(self) -> None:
        """Start everything, keep it running, stop it in order."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = await self.nats.start()
        log.info("nats-server at %s, store %s", url, self.nats.store_dir)
        (self.data_dir / "nats.url").write_text(url)  # where `jobcast keys` finds it
        env = dict(os.environ)
        env.update(JOBCAST_NATS_URL=url, JOBCAST_DATA_DIR=str(self.data_dir))
        env.update(JOBCAST_HOST=self.host, JOBCAST_PORT=str(self.port))
        for child in self.children:
            await child.start(env)
        print(f"jobcast: serving on http://{self.host}:{self.port} (data in {self.data_dir}); Ctrl-C stops",
              flush=True)  # fmt: skip
        try:
            await self._watch(env)
        finally:
            grace = float(os.environ.get("JOBCAST_WORKER_GRACE_S", "30")) + 5
            await asyncio.gather(*(child.stop(grace) for child in self.children))
            await self.nats.stop()
            log.info("stopped")

    async def _watch(self, env: dict[str, str]) -> None:
        while not self._stop.is_set():
            waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children if c.process}
            nats_proc = self.nats.process
            assert nats_proc is not None
            nats_wait = asyncio.ensure_future(nats_proc.wait())
            stop_wait = asyncio.ensure_future(self._stop.wait())
            done, pending = await asyncio.wait(
                [*waits, nats_wait, stop_wait], return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if self._stop.is_set():
                return
            if nats_wait in done:
                log.error("nats-server exited (%s); restarting it on the same port", nats_proc.returncode)
                await asyncio.sleep(RESTART_MIN_S)
                await self.nats.start()
            for task in done:
                child = waits.get(task)
                if child is not None:
                    await self._restart(child, env)

    async def _restart(self, child: Child, env: dict[str, str]) -> None:
        code = child.process.returncode if child.process else None
        if time.monotonic() - child.started_at > HEALTHY_AFTER_S:
            child.backoff = RESTART_MIN_S
        log.error("%s exited with %s; restarting in %.1f s", child.name, code, child.backoff)
        try:
            await asyncio.wait_for(self._stop.wait(), child.backoff)
            return
        except TimeoutError:
            pass
        child.backoff = min(child.backoff * 2, RESTART_MAX_S)
        child.restarts += 1
        await child.start(env)


def default_pools() -> list[str]:
    """One worker per pool."""
    return [pool.value for pool in Pool]
