"""`jobcast keys`: create, list and revoke API keys in the JOBCAST_KEYS bucket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import sys
import time
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from streams import (
    ApiKeyRecord,
    admin_key_from_env,
    close_quietly,
    connect,
    is_loopback,
    key_hash,
    keys_bucket,
    nats_servers,
    without_credentials,
)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CLI_CONNECT_TIMEOUT_S = 4.0
"""A one-shot command gives up on NATS after this long (the promise is 5 s)."""


CONFIGURATION_ERROR = 2
"""Exit status of a server that cannot run as configured: `jobcast serve` does not restart it."""


class ConfigurationError(Exception):
    """A setting that keeps a server from starting: exit status 2, and the message as one line."""


def nats_url(data_dir: Path) -> str:
    """JOBCAST_NATS_URL (one URL, or a cluster's comma-separated), else the URL `jobcast serve` left in
    the data dir."""
    if url := os.environ.get("JOBCAST_NATS_URL"):
        return url
    marker = data_dir / "nats.url"
    if marker.exists():
        return marker.read_text().strip()
    return "nats://127.0.0.1:4222"


async def cli_connection(data_dir: Path, name: str) -> Client | None:
    """A connection for a one-shot command, or None after saying why there is none."""
    url = nats_url(data_dir)
    try:
        nats_servers(url)
    except ValueError as exc:
        print(f"jobcast: {exc}", file=sys.stderr)
        return None
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        """Kept for the one line below; a warning per attempt would only repeat it."""
        errors[:] = [exc]

    try:
        # nats-py tries a server in its pool again and again while max_reconnect_attempts is 0
        # (only a positive cap ends the initial connect), so the cap is 1, and a deadline
        # bounds the whole attempt whatever the library does.
        async with asyncio.timeout(CLI_CONNECT_TIMEOUT_S):
            return await connect(
                url, name=name, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2,
                error_cb=remember,
            )  # fmt: skip
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        last = errors[-1] if errors else exc  # "no servers available" hides why
        reason = str(last) or type(last).__name__
        print(
            f"cannot reach NATS at {without_credentials(url)} ({reason}); is `jobcast serve` running?",
            file=sys.stderr,
        )
        return None


async def stored_key_exists(nc: Client) -> bool:
    """Whether the JOBCAST_KEYS bucket holds a key the API would accept."""
    kv = await keys_bucket(nc.jetstream())
    try:
        names = await kv.keys()
    except NoKeysError:
        return False
    for name in names:
        with contextlib.suppress(KeyNotFoundError, msgspec.DecodeError):
            entry = await kv.get(name)
            msgspec.json.decode(entry.value or b"", type=ApiKeyRecord)
            return True
    return False


async def check_public_bind(host: str, url: str) -> None:
    """Refuse (ConfigurationError) to serve `host` off this machine while no key exists anywhere.

    Connects to NATS at `url` only when the answer depends on the stored keys, and waits for
    it as the API itself would.
    """
    try:
        configured = admin_key_from_env()  # which the API stores as a key at start-up
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    if is_loopback(host) or configured:
        return

    async def closed_on_purpose() -> None:
        """Closing this connection is no news worth a log line."""

    nc = await connect(url, name="jobcast-preflight", disconnected_cb=closed_on_purpose)
    try:
        if await stored_key_exists(nc):
            return
    finally:
        await close_quietly(nc)
    raise ConfigurationError(
        f"refusing to serve on {host} without an API key: anyone reaching it would be admin. Set "
        "JOBCAST_ADMIN_KEY (or JOBCAST_ADMIN_KEY_FILE), or serve on 127.0.0.1 first and run "
        "`jobcast keys create --name NAME --admin`."
    )


async def run(action: str, name: str | None, admin: bool, data_dir: Path) -> int:
    """Carry out one `keys` action; prints what a person needs and returns an exit code."""
    nc = await cli_connection(data_dir, "jobcast-keys")
    if nc is None:
        return 1
    try:
        return await _act(nc, action, name, admin)
    except (nats.errors.Error, TimeoutError) as exc:  # e.g. a cluster electing the bucket's leader
        print(
            f"the key store did not answer ({exc or type(exc).__name__}); try again (`jobcast keys list` "
            "shows whether a key was created)",
            file=sys.stderr,
        )
        return 1
    finally:
        await close_quietly(nc)


async def _act(nc: Client, action: str, name: str | None, admin: bool) -> int:
    """`run`'s action on a connection; NATS errors go to the caller."""
    kv = await keys_bucket(nc.jetstream())
    if action == "create":
        assert name is not None
        if not _NAME.match(name):
            print("a key name is 1-64 letters, digits, '-' or '_'", file=sys.stderr)
            return 2
        key = "jc_" + secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            name=name,
            sha256=key_hash(key),
            admin=admin,
            created_at=time.time(),
        )
        try:
            await kv.create(name, msgspec.json.encode(record))
        except KeyWrongLastSequenceError:
            print(f"a key named {name!r} exists already; revoke it first", file=sys.stderr)
            return 1
        print(key)
        print(f"key {name!r}{' (admin)' if admin else ''} created; it is shown this once", file=sys.stderr)
    elif action == "list":
        try:
            names = sorted(await kv.keys())
        except NoKeysError:
            names = []
        for each in names:
            entry = await kv.get(each)
            record = msgspec.json.decode(entry.value or b"{}", type=ApiKeyRecord)
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created_at))
            print(f"{record.name}\t{'admin' if record.admin else 'user'}\t{created} UTC")
    else:
        assert name is not None
        try:
            await kv.get(name)
        except KeyNotFoundError:
            print(f"no key named {name!r}", file=sys.stderr)
            return 1
        await kv.delete(name)
        print(f"key {name!r} revoked")
    return 0
