"""Connecting to NATS the same way from every process."""

from __future__ import annotations

import logging
import re
from typing import Any

import nats
from nats.aio.client import Client

log = logging.getLogger("jobcast.nats")
_CREDENTIALS = re.compile(r"//[^/@,]*@")


def without_credentials(url: str) -> str:
    """`url` (or a comma-separated list of them) with any user, password or token left out, for logs."""
    return _CREDENTIALS.sub("//", url)


async def connect(url: str, name: str, **options: Any) -> Client:
    """Connect with reconnects forever: a broker restart must not end a process."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnected() -> None:
        log.info("nats: disconnected from %s", without_credentials(url))

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", without_credentials(url))

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
    return await nats.connect(url, **(settings | options))


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
