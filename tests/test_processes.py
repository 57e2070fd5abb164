"""`jobcast serve` as a process tree: clear refusals, one owner per data dir, no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest

from jobcast.lifeline import PARENT_GONE_EXIT_S
from streams import NatsServer
from tests.chaos._procs import wait_ready
from tests.conftest import free_port, submit, worker_process

ORPHAN_DEADLINE_S = 5.0
"""Issue 14: children of a SIGKILLed serve are gone within 5 s."""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any key setting, so no key exists anywhere unless a test puts one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAST_")}
    env.update(JOBCAST_LOG_LEVEL="WARNING", **extra)
    return env


async def jobcast(*args: str, env: dict[str, str], timeout: float = 30) -> tuple[int, str, float]:
    """Run `jobcast ARGS` to its end (killing what it started past `timeout`); returns exit
    status, stderr and seconds taken. stderr goes through a file: a child left running would
    hold a pipe open for ever."""
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jobcast", *args, env=env, stdout=asyncio.subprocess.DEVNULL,
            stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            for pid in [proc.pid, *children(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            await proc.wait()
        took = time.monotonic() - started
        err.seek(0)
        assert proc.returncode is not None
        return proc.returncode, err.read().decode(errors="replace"), took


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Still running: a zombie has exited (whether its new parent reaps it is not ours to say)."""
    found = stat(pid)
    return found is not None and found[0] != "Z"


def processes(parent: int | None = None) -> dict[int, str]:
    """Living processes (of `parent` only, if given) and their command lines, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        info = stat(int(entry.name)) if entry.name.isdigit() else None
        if info is not None and info[0] != "Z" and parent in (None, info[1]):
            with contextlib.suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def children(pid: int) -> dict[int, str]:
    """Living direct children of `pid` and their command lines."""
    return processes(parent=pid)


async def serve_children(serve: asyncio.subprocess.Process, names: list[str]) -> dict[int, str]:
    """serve's children once one runs for each of `names` (substrings of their command lines)."""
    async with asyncio.timeout(30):
        while True:
            assert serve.returncode is None, f"serve exited with {serve.returncode}"
            found = children(serve.pid)
            if all(any(name in cmd for cmd in found.values()) for name in names):
                return found
            await asyncio.sleep(0.1)


def nats_servers_on(store: Path) -> list[int]:
    """Living nats-server processes whose store is `store`."""
    return [pid for pid, cmd in processes().items() if "nats-server" in cmd and f"-sd {store} " in cmd]


@contextlib.asynccontextmanager
async def serve(data_dir: Path, port: int, **env: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`jobcast serve --pools cpu` on loopback; it and everything it started are gone afterwards."""
    argv = [sys.executable, "-m", "jobcast", "serve", "--port", str(port), "--data-dir", str(data_dir),
            "--pools", "cpu"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, env=clean_env(**env), start_new_session=True)
    seen: dict[int, str] = {}
    try:
        yield proc
    finally:
        seen.update(children(proc.pid))
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        for pid in seen:  # children run in their own sessions: never leave one behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


async def test_serve_public_bind_without_key_exits_2_at_once(tmp_path: Path) -> None:
    data = tmp_path / "d"
    args = ("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(data))
    code, err, took = await jobcast(*args, "--pools", "cpu", env=clean_env(), timeout=30)

    assert code == 2, err
    assert len(lines(err)) == 1, err
    assert "refusing to serve on 0.0.0.0 without an API key" in err
    assert "JOBCAST_ADMIN_KEY" in err
    assert "Traceback" not in err
    assert took < 15, took
    assert nats_servers_on(data / "nats") == []  # the embedded server it started is stopped

    # JOBCAST_ADMIN_KEY_FILE names the key: one that cannot be read is a configuration error too
    unreadable = tmp_path / "missing-key-file"
    code, err, _ = await jobcast(*args, env=clean_env(JOBCAST_ADMIN_KEY_FILE=str(unreadable)), timeout=30)
    assert code == 2, err
    assert len(lines(err)) == 1, err
    assert err.startswith(f"jobcast: JOBCAST_ADMIN_KEY_FILE={unreadable}: cannot read it ("), err
    assert "Traceback" not in err
    assert nats_servers_on(data / "nats") == []


@pytest.mark.slow
async def test_api_public_bind_without_key_exits_2_in_one_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = clean_env(JOBCAST_NATS_URL=nats_server.url, JOBCAST_DATA_DIR=str(tmp_path / "d"))
    args = ("api", "--host", "0.0.0.0", "--port", str(free_port()))
    code, err, _ = await jobcast(*args, env=env, timeout=30)

    assert code == 2, err
    assert len(lines(err)) == 1, err
    assert "refusing to serve on 0.0.0.0 without an API key" in err
    assert "Traceback" not in err

    unreadable = tmp_path / "missing-key-file"
    code, err, _ = await jobcast(*args, env=env | {"JOBCAST_ADMIN_KEY_FILE": str(unreadable)}, timeout=30)
    assert code == 2, err
    assert len(lines(err)) == 1, err
    assert err.startswith(f"jobcast: JOBCAST_ADMIN_KEY_FILE={unreadable}: cannot read it ("), err
    assert "Traceback" not in err


@pytest.mark.slow
async def test_keys_fail_fast_without_nats(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    env = clean_env(JOBCAST_NATS_URL=url)
    for action in (["create", "--name", "carol"], ["list"], ["revoke", "carol"]):
        code, err, took = await jobcast("keys", "--data-dir", str(tmp_path), *action, env=env, timeout=20)
        assert code == 1, (action, err)
        assert took < 5, (action, took)
        assert len(lines(err)) == 1, (action, err)
        assert err.startswith(f"cannot reach NATS at {url} ("), err


@pytest.mark.slow
async def test_nothing_outlives_a_killed_serve(tmp_path: Path) -> None:
    port = free_port()
    # a long grace must not matter: nobody waits for these workers any more
    async with serve(tmp_path / "d", port, JOBCAST_WORKER_GRACE_S="60") as proc:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, 60, proc)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            job = await submit(client, params={"duration_s": 120, "steps": 120})
            async with asyncio.timeout(30):
                while (await client.get(f"/api/v1/jobs/{job['id']}")).json()["status"] != "running":  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        tree = await serve_children(proc, ["nats-server", "jobcast api", "worker --pool cpu"])

        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await proc.wait()
        try:
            while any(alive(pid) for pid in tree) and time.monotonic() - killed < 30:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            took = time.monotonic() - killed
            left = {pid: cmd for pid, cmd in tree.items() if alive(pid)}
        finally:
            for pid in tree:  # orphans are no longer serve's children: the fixture cannot find them
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    assert not left, left
    print(
        f"orphans of a SIGKILLed serve (nats-server, api, worker with a running job) exited in {took:.2f} s"
    )
    assert took < ORPHAN_DEADLINE_S, took


@pytest.mark.slow
async def test_second_serve_on_a_data_dir_refuses(tmp_path: Path) -> None:
    data = tmp_path / "d"
    port = free_port()
    async with serve(data, port) as first:
        await wait_ready(f"http://127.0.0.1:{port}", 60, first)
        [owner_nats] = nats_servers_on(data / "nats")

        other = ("serve", "--port", str(free_port()), "--data-dir", str(data), "--pools", "cpu")
        code, err, _ = await jobcast(*other, env=clean_env(), timeout=30)
        assert code == 2, err
        assert lines(err) == [
            f"jobcast: {data} is in use by another `jobcast serve` (pid {first.pid}, or what it started); "
            "stop it or choose another --data-dir"
        ]
        assert nats_servers_on(data / "nats") == [owner_nats]  # no second server on the store

        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 60) == 0

    port = free_port()
    async with serve(data, port) as again:  # the data dir is free once its owner stopped
        await wait_ready(f"http://127.0.0.1:{port}", 60, again)
        again.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.wait(), 60) == 0


async def test_serve_stops_on_a_child_configuration_error(tmp_path: Path) -> None:
    data = tmp_path / "d"
    args = ("serve", "--port", str(free_port()), "--data-dir", str(data), "--pools", "cpu,nonsense")
    code, err, took = await jobcast(*args, env=clean_env(), timeout=60)

    assert code == 2, err  # not restarted for ever: `worker --pool nonsense` can never run
    assert "invalid choice: 'nonsense'" in err
    assert "worker-nonsense cannot run as configured (exit status 2); stopping" in err
    assert nats_servers_on(data / "nats") == []
    assert took < 45, took


@pytest.mark.slow
async def test_a_worker_started_by_hand_outlives_its_shell(nats_server: NatsServer, tmp_path: Path) -> None:
    """Only serve's children watch their parent: `jobcast worker &` from a shell keeps running."""
    argv, env = worker_process(nats_server.url, "cpu", JOBCAST_LOG_LEVEL="INFO")
    log = tmp_path / "worker.log"
    command = " ".join(shlex.quote(str(part)) for part in argv)
    shell = await asyncio.create_subprocess_exec(
        "sh", "-c", f"{command} >{shlex.quote(str(log))} 2>&1 & echo $!", env=env,
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    out, _ = await shell.communicate()
    worker = int(out)
    try:
        async with asyncio.timeout(30):
            while "pool cpu" not in (log.read_text() if log.exists() else ""):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(PARENT_GONE_EXIT_S + 1)  # past the deadline a lifeline would set
        assert alive(worker), log.read_text()
        assert "serve is gone" not in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)  # sh without job control: it shares the shell's group


@pytest.mark.slow
async def test_the_embedded_nats_server_wants_the_data_dirs_token(tmp_path: Path) -> None:
    """Whoever reaches the NATS port could write an admin key: serve's server takes only its token."""
    data = tmp_path / "d"
    port = free_port()
    async with serve(data, port) as proc:
        await wait_ready(f"http://127.0.0.1:{port}", 60, proc)
        url = (data / "nats.url").read_text().strip()
        token = (data / "nats-token").read_text().strip()
        assert url.startswith(f"nats://{token}@127.0.0.1:"), url
        for secret in (data / "nats.url", data / "nats-token", data / "nats" / "server.conf"):
            assert secret.stat().st_mode & 0o077 == 0, secret  # this user's only
        [server] = nats_servers_on(data / "nats")
        assert token not in processes()[server]  # a command line is every local user's to read

        # a client without the token, speaking the protocol itself (nats-py leaks its socket here)
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            assert b'"auth_required":true' in await reader.readline()
            writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(
                b"-ERR 'Authorization Violation'"
            )
        finally:
            writer.close()
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            assert (await nc.jetstream().stream_info("JOBS")).config.name == "JOBS"
        finally:
            await nc.close()

        # the CLI finds the token in nats.url; what it prints never carries it
        code, err, _ = await jobcast("keys", "--data-dir", str(data), "list", env=clean_env(), timeout=30)
        assert code == 0, err
        code, err, _ = await jobcast(
            "keys", "--data-dir", str(data), "list", env=clean_env(JOBCAST_NATS_URL=f"nats://{token}@127.0.0.1:1"),
            timeout=30,
        )  # fmt: skip
        assert code == 1
        assert token not in err
        assert "cannot reach NATS at nats://127.0.0.1:1 (" in err


async def test_an_empty_secret_file_is_refused_not_used(tmp_path: Path) -> None:
    """An empty nats-token would start NATS without authentication, an empty secret sign with ''."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "nats-token").write_text("\n")
    code, err, _ = await jobcast(
        "serve", "--port", str(free_port()), "--data-dir", str(data), env=clean_env()
    )
    assert code == 2, err
    assert lines(err) == [
        f"jobcast: {data / 'nats-token'} holds no usable secret (under 32 characters); delete it"
    ]
    assert nats_servers_on(data / "nats") == []
