"""`jobcast keys`: create, list and revoke API keys in the JOBCAST_KEYS bucket."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
import time
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from streams import ApiKeyRecord, close_quietly, connect, keys_bucket

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def nats_url(data_dir: Path) -> str:
    """JOBCAST_NATS_URL, else the URL `jobcast serve` left in the data dir."""
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
        return await connect(url, name=name, max_reconnect_attempts=0, allow_reconnect=False)
    except (nats.errors.Error, OSError) as exc:
        print(f"cannot reach NATS at {url} ({exc}); is `jobcast serve` running?", file=sys.stderr)
        return None


async def run(action: str, name: str | None, admin: bool, data_dir: Path) -> int:
    """Carry out one `keys` action; prints what a person needs and returns an exit code."""
    nc = await cli_connection(data_dir, "jobcast-keys")
    if nc is None:
        return 1
    try:
        kv = await keys_bucket(nc.jetstream())
        if action == "create":
            assert name is not None
            if not _NAME.match(name):
                print("a key name is 1-64 letters, digits, '-' or '_'", file=sys.stderr)
                return 2
            key = "jc_" + secrets.token_urlsafe(32)
            record = ApiKeyRecord(
                name=name,
                sha256=hashlib.sha256(key.encode()).hexdigest(),
                admin=admin,
                created_at=time.time(),
            )
            try:
                await kv.create(name, msgspec.json.encode(record))
            except nats.errors.Error:
                print(f"a key named {name!r} exists already; revoke it first", file=sys.stderr)
                return 1
            print(key)
            print(
                f"key {name!r}{' (admin)' if admin else ''} created; it is shown this once", file=sys.stderr
            )
        elif action == "list":
            try:
                names = sorted(await kv.keys())
            except nats.errors.Error:
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
    finally:
        await close_quietly(nc)
