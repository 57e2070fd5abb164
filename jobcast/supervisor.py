"""`jobcast serve`: one process tree for one machine.

Starts an embedded nats-server, one API and one worker per pool as child processes,
restarts whatever dies (a crashing worker never takes the API down), and on Ctrl-C /
SIGTERM stops them in order: API and workers first, then NATS. Nothing outlives it: the
children watch a lifeline (see jobcast.lifeline) and nats-server gets SIGTERM from the kernel
when serve dies, however it dies. One data dir has one owner: serve holds `serve.lock` in it,
and so does every child, so a second serve refuses until the whole tree is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobcast.keys import CONFIGURATION_ERROR, ConfigurationError, check_public_bind
from jobcast.lifeline import Lifeline
from streams import NatsServer, Pool, stored_secret, stream_replicas, write_private

log = logging.getLogger("jobcast.serve")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0
"""A child that ran this long is healthy again: its restart backoff resets."""
LOCK_FILE = "serve.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Take `<data_dir>/serve.lock` for as long as the returned descriptor stays open anywhere.

    flock(2) is released by the kernel when the last descriptor of the open file closes, so a
    SIGKILLed owner leaves no stale lock, only its children while they stop.
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigurationError(
            f"{data_dir} is in use by another `jobcast serve` (pid {owner}, or what it started); "
            "stop it or choose another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@dataclass
class Child:
    """A supervised child process."""

    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = RESTART_MIN_S
    restarts: int = field(default=0)

    async def start(self, env: dict[str, str], keep_fds: tuple[int, ...]) -> None:
        """Start (or restart) the process in its own session, so Ctrl-C reaches only the supervisor."""
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, pass_fds=keep_fds
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
        """Raises ValueError for a setting serve cannot run with (its message is the one line to show)."""
        if stream_replicas() != 1:
            # Else the API would fail at every start (one server keeps one copy), and be restarted for ever.
            raise ValueError(
                "jobcast serve runs one nats-server, which keeps one copy of each stream: unset "
                "JOBCAST_STREAM_REPLICAS, or run a cluster (docs/deploy.md)"
            )
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port
        # Whoever reaches the NATS port can do anything (write a key, read every job), and on one
        # machine every local user reaches loopback: clients must present this data dir's token.
        token = stored_secret(self.data_dir / "nats-token")
        self.nats = NatsServer(self.data_dir / "nats", port=nats_port, die_with_parent=True, token=token)
        me = [sys.executable, "-m", "jobcast"]
        self.children = [Child("api", [*me, "api", "--host", host, "--port", str(port)])]
        self.children += [Child(f"worker-{pool}", [*me, "worker", "--pool", pool]) for pool in pools]
        self._stop = asyncio.Event()
        self._keep_fds: tuple[int, ...] = ()
        self.exit_code = 0

    def request_stop(self) -> None:
        """Begin an orderly shutdown."""
        self._stop.set()

    async def run(self) -> int:
        """Start everything, keep it running, stop it in order; returns the exit status.

        Raises:
            ConfigurationError: the data dir is in use, or the bind needs a key and none exists.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_data_dir(self.data_dir)
        lifeline = Lifeline()
        self.nats.keep_fds = (lock,)  # the kernel stops nats-server; it needs no lifeline
        self._keep_fds = (lock, lifeline.read_fd)
        try:
            await self._run(lifeline)
        finally:
            lifeline.close()
            os.close(lock)
        return self.exit_code

    async def _run(self, lifeline: Lifeline) -> None:
        url = await self.nats.start()
        try:
            await check_public_bind(self.host, url)
        except BaseException:
            await self.nats.stop()
            raise
        log.info("nats-server at %s, store %s", self.nats.address, self.nats.store_dir)
        write_private(self.data_dir / "nats.url", url)  # where `jobcast keys` finds it; it holds the token
        env = dict(os.environ)
        env.update(JOBCAST_NATS_URL=url, JOBCAST_DATA_DIR=str(self.data_dir))
        env.update(JOBCAST_HOST=self.host, JOBCAST_PORT=str(self.port), **lifeline.env())
        for child in self.children:
            await child.start(env, self._keep_fds)
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
        if code == CONFIGURATION_ERROR:  # it said why on stderr, which it shares with serve
            log.error("%s cannot run as configured (exit status %d); stopping", child.name, code)
            self.exit_code = CONFIGURATION_ERROR
            self.request_stop()
            return
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
        await child.start(env, self._keep_fds)


def default_pools() -> list[str]:
    """One worker per pool."""
    return [pool.value for pool in Pool]
