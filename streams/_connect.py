"""Connecting to NATS the same way from every process."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client

log = logging.getLogger("jobcast.nats")
_CREDENTIALS = re.compile(r"//[^/@,]*@")
SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


def without_credentials(url: str) -> str:
    """`url` (or a comma-separated list of them) with any user, password or token left out, for logs."""
    return _CREDENTIALS.sub("//", url)


def nats_servers(url: str) -> list[str]:
    """The servers JOBCAST_NATS_URL names: one URL, or a cluster's nodes comma-separated.

    Raises:
        ValueError: an empty list, or a part that is no nats://, tls://, ws:// or wss:// URL with a host
            (named without its credentials).
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("JOBCAST_NATS_URL names no server")
    for server in servers:
        try:
            parts = urlsplit(server if "://" in server else f"nats://{server}")
            parts.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(
                f"JOBCAST_NATS_URL: {without_credentials(server)!r} is not a NATS URL (nats://host:port); "
                "several are separated by commas"
            )
    return servers


async def connect(url: str, name: str, **options: Any) -> Client:
    """Connect to one of the servers `url` lists (see `nats_servers`) with reconnects forever, to
    whichever node answers: a broker restart, or a cluster node lost, must not end a process."""
    nc = Client()
    node = [without_credentials(url)]
    """The node connected to last (which a log line about a cluster should name)."""

    def remember() -> str:
        if (current := nc.connected_url) is not None:
            node[0] = without_credentials(current.geturl())
        return node[0]

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnected() -> None:
        log.info("nats: disconnected from %s", node[0])

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", remember())

    settings: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    await nc.connect(servers=nats_servers(url), **(settings | options))
    remember()
    return nc


async def close_quietly(nc: Client) -> None:
    """Flush what was published, then close (drain would wait on every subscription)."""
    try:
        if nc.is_connected:
            await nc.flush(timeout=2)
    except Exception as exc:  # closing anyway
        log.debug("flush before close: %s", exc)
    try:
        await nc.close()
    except OSError as exc:
        # The server went away with writes still buffered: closing drains the dead socket and
        # raises ConnectionResetError. The client is closed all the same, and the caller's own
        # clean-up (the API's database) must still run.
        log.debug("close: %s", exc)
