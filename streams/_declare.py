"""Declaring the stream and buckets while JetStream is not ready yet.

A process may start before its JetStream can answer: a fresh cluster still electing its meta
leader, or one too busy to reply in time (several APIs declaring at once on loaded nodes). Such
errors pass by themselves, so the declaration is retried for a while; an error in what is
declared (a bad config, replicas the cluster cannot place) fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import stamina
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError

from streams._buckets import callbacks_bucket, files_store, keys_bucket
from streams._config import ensure_stream

log = logging.getLogger("jobcast.streams")
T = TypeVar("T")

# Every retry loop logs its own line, naming what it retries. stamina's default hooks would log
# a second one and count into prometheus_client's global registry, which /metrics does not serve.
stamina.instrumentation.set_on_retry_hooks([])

DECLARE_TIMEOUT_S = 30.0
"""How long a declaration rides out JetStream not answering before the process gives up."""


def is_transient(exc: Exception) -> bool:
    """Whether `exc` says JetStream cannot answer yet (a timeout, no responders, a lost or
    reconnecting connection, a 503), not that it refused the request: any other JetStream answer
    (a config it will not take, a conflict) comes back the same however often it is asked."""
    if isinstance(exc, ServiceUnavailableError):  # nats-py raises it for no responders, too
        return True
    return isinstance(exc, nats.errors.Error | TimeoutError) and not isinstance(exc, APIError)


async def riding_out(what: str, declare: Callable[[], Awaitable[T]], timeout: float = DECLARE_TIMEOUT_S) -> T:
    """`declare()`, retried with backoff while it fails with a transient error, for up to `timeout`
    seconds in all; then, or on any other error, the error is raised. `declare` must be idempotent."""
    retries = stamina.retry_context(
        on=is_transient, attempts=None, timeout=timeout, wait_initial=0.2, wait_max=2.0, wait_jitter=0.2
    )
    async for attempt in retries:
        with attempt:
            try:
                return await declare()
            except Exception as exc:
                if is_transient(exc):
                    log.warning(
                        "declaring %s: JetStream is not ready (%s: %s); retrying for up to %.0f s",
                        what, type(exc).__name__, exc, timeout,
                    )  # fmt: skip
                raise
    raise AssertionError("unreachable: stamina raises the last error")


async def ensure_jetstream(js: JetStreamContext) -> None:
    """Create, or bring in line, the JOBS stream, the API's KV buckets and the files store, as the API
    does at start, riding out JetStream not being ready (`riding_out`)."""

    async def declare() -> None:
        await ensure_stream(js)
        # Not the heartbeat bucket: its TTL is the workers' setting (JOBCAST_WORKER_TTL_S), so a
        # worker creates it; declared here with the API's own value, it refused the workers' one.
        # Nor the stage cache's bucket and store: only workers use them, and each creates them (on a
        # cluster, raising two more streams' replicas here kept the API from serving for seconds).
        for bucket in (keys_bucket, callbacks_bucket, files_store):
            await bucket(js)

    await riding_out("the JOBS stream and the buckets", declare)
