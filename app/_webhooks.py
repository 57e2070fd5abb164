"""Webhooks: POST a finished job to its callback_url, signed, retried, sent by exactly one API.

Every API instance sees every terminal event; the one that creates the job's key in the
callbacks KV bucket sends it. The outcome goes back into the stream as a `callback` event,
so `callback_status` is projected like everything else. A claim whose sender died expires,
and the periodic sweep of any instance picks the callback up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec
import nats.errors
import stamina
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sqlalchemy import select

from app._db import JobRow
from app._exceptions import NotFoundError
from app._hub import Applied
from app._publisher import Publisher
from app._queries import JobQueries
from streams import (
    TERMINAL_STATUSES,
    AddressPolicy,
    CallbackResult,
    EgressRefusedError,
    TaskSupervisor,
    callbacks_bucket,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("jobcast.webhooks")

SIGNATURE_HEADER = "X-Jobcast-Signature"
"""`sha256=<hex HMAC-SHA256 of the raw body>` under the server's webhook secret."""


def _http_error() -> type[Exception]:
    import httpx

    return httpx.HTTPError


class _UndeliveredError(Exception):
    """One delivery of a callback that did not succeed: retried, up to JOBCAST_WEBHOOK_TRIES."""

    def __init__(self, error: str, status: int | None) -> None:
        super().__init__(error)
        self.error = error
        self.status = status


def sign(key: bytes, body: bytes) -> str:
    """The signature header value for `body`."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class Webhooks:
    """Sends callbacks for jobs that ended."""

    def __init__(self, service: Publisher, queries: JobQueries) -> None:
        self.service = service
        self.queries = queries
        self.settings = service.settings
        self.instance = uuid.uuid4().hex
        self._key = self.settings.signing_key()
        self._kv: KeyValue | None = None
        self._client_: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.local_mode: Callable[[], bool] = lambda: False
        """Set by the app: local mode allows loopback callbacks."""

    @property
    def _client(self) -> httpx.AsyncClient:
        # httpx (with the rich it imports) costs the API ~5 MB of idle RSS: loaded on the first callback.
        if self._client_ is None:
            import httpx

            self._client_ = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False)
        return self._client_

    async def start(self, tasks: TaskSupervisor) -> None:
        """Listen for finished jobs and look for callbacks left undelivered (task `webhook-sweep`)."""
        self._kv = await callbacks_bucket(self.service.js)
        self.service.hub.listeners.append(self._on_applied)
        tasks.start("webhook-sweep", self._sweep_forever)

    async def stop(self) -> None:
        """Stop sending; unsent callbacks are picked up by another instance or the next start."""
        with contextlib.suppress(ValueError):
            self.service.hub.listeners.remove(self._on_applied)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client_ is not None:
            await self._client_.aclose()

    def _on_applied(self, item: Applied) -> None:
        if (
            item.ends
            and item.kind in TERMINAL_STATUSES
            and item.job_id in self.service.projection.callbacks_due
        ):
            self.service.projection.callbacks_due.discard(item.job_id)
            self._spawn(item.job_id)

    def _spawn(self, job_id: str) -> None:
        task = asyncio.create_task(self.deliver(job_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep_forever(self) -> None:
        while True:
            async with self.service.db.session() as session:
                ids = await session.scalars(
                    select(JobRow.id).where(
                        JobRow.callback_status == "pending", JobRow.status.in_(sorted(TERMINAL_STATUSES))
                    )
                )
                for job_id in ids:
                    self._spawn(job_id)
            await asyncio.sleep(self.settings.webhook_sweep_s)

    async def _refused(self, url: str) -> str:
        """Why `url` may not be called: its host resolves to a private, loopback or link-local
        address (so a webhook cannot reach internal services), unless settings allow it."""
        policy = AddressPolicy(
            allow_loopback=self.settings.webhook_allow_loopback or self.local_mode(),
            allow_private=self.settings.webhook_allow_private,
        )
        try:
            await policy.resolve(urlsplit(url).hostname or "")
        except EgressRefusedError as exc:
            return str(exc)
        return ""

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST a callback once; its HTTP status, or raises _UndeliveredError."""
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except _http_error() as exc:
            raise _UndeliveredError(f"{type(exc).__name__}: {exc}", None) from exc
        if not response.is_success:
            raise _UndeliveredError(f"HTTP {response.status_code}", response.status_code)
        return response.status_code

    async def deliver(self, job_id: str) -> None:
        """Send one job's callback if it is due and nobody else is sending it."""
        try:
            job = await self.queries.get(job_id, None)
        except NotFoundError:
            return  # deleted meanwhile
        if not job.callback_url or job.callback_status != "pending" or job.status not in TERMINAL_STATUSES:
            return
        assert self._kv is not None
        claim = f"{job.id}.{job.attempt}"
        try:
            await self._kv.create(claim, self.instance.encode())
        except (KeyWrongLastSequenceError, nats.errors.Error):
            return  # another instance has it (or had it, and it has not expired yet)
        refused = await self._refused(job.callback_url)
        body = msgspec.json.encode(job)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._key, body),
            "X-Jobcast-Event": f"job.{job.status}",
            "X-Jobcast-Delivery": claim,
        }
        error, status, tries = refused, None, 0
        if not refused and self.settings.webhook_tries > 0:
            backoff = self.settings.webhook_backoff_s
            retries = stamina.retry_context(
                on=_UndeliveredError, attempts=self.settings.webhook_tries, timeout=None, wait_initial=backoff,
                wait_max=backoff * 2**self.settings.webhook_tries, wait_jitter=0.0, wait_exp_base=2,
            )  # fmt: skip
            try:
                async for attempt in retries:  # the backoff doubles from webhook_backoff_s, no jitter
                    with attempt:
                        tries = attempt.num
                        status = await self._post(job.callback_url, body, headers)
            except _UndeliveredError as exc:
                status, error = exc.status, exc.error
        delivered = not error
        log.info(
            "callback of %s to %s: %s after %d tries", job.id, job.callback_url, error or "delivered", tries
        )
        result = CallbackResult(
            job_id=job.id,
            attempt=job.attempt,
            delivered=delivered,
            tries=tries,
            error=error,
            http_status=status,
        )
        await self.service.publish(result)
