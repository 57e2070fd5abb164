"""Read-your-writes across API instances.

Every API instance applies the one JOBS stream to its own SQLite, so an instance may be a few
milliseconds behind another. Two rules keep a client from seeing that:

- A request for a job or file this instance does not have yet looks up the newest message of it in
  the stream (a get per subject, answered by the stream's leader) and, when there is one it has not
  applied, waits for its projection to apply it before the handler runs. A job that exists is never
  a 404 on another instance; a job that does not exist costs those lookups, no wait.
- Every response carries `X-Jobcast-Seq`: the stream sequence this instance had applied when it
  answered, which covers the writes it answered for. A client that sends it back, to any instance,
  gets an answer that includes everything up to it (e.g. a cancel made through A, read through B).

Either wait is bounded by JOBCAST_SUBMIT_TIMEOUT_S; past it the answer is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import nats.errors
from litestar import Litestar
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as NoMessageError
from sqlalchemy import Table

from app._db import FILES, JOBS, Database
from app._exceptions import StatusError, UnavailableError, queue_unavailable
from app._lean import lean_reads
from app._projection import Projection
from streams import STREAM, files_subject, job_history_subjects

SEQ_HEADER = "x-jobcast-seq"
"""Request and response header: a stream sequence the answer must include (see the module doc)."""


class Freshness:
    """Makes this instance's projection catch up with what a request names."""

    def __init__(self, db: Database, js: JetStreamContext, projection: Projection, timeout_s: float) -> None:
        self.db = db
        self.js = js
        self.projection = projection
        self.timeout_s = timeout_s

    async def reach(self, seq: int, what: str) -> None:
        """Return once this instance has applied `seq`; UnavailableError (503) after the timeout."""
        if seq <= self.projection.applied_seq:
            return
        try:
            await self.projection.wait_for(seq, self.timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"this API instance has not yet applied {what} (stream sequence {seq}); try again"
            ) from None

    async def asked(self, header: str) -> None:
        """Wait for the sequence a client sent in X-Jobcast-Seq (400 unless it is one the stream has)."""
        if not header.isdigit():
            raise StatusError(f"{SEQ_HEADER}: a stream sequence (a whole number) is expected, not {header!r}")
        seq = int(header)
        if seq <= self.projection.applied_seq:
            return
        try:
            last = (await self.js.stream_info(STREAM)).state.last_seq
        except (nats.errors.Error, TimeoutError) as exc:
            raise queue_unavailable(exc) from exc
        if seq > last:
            raise StatusError(f"{SEQ_HEADER}: {seq} is beyond the job log, which ends at {last}")
        await self.reach(seq, f"the sequence {SEQ_HEADER} names")

    async def missing(self, table: Table, ident: str, subjects: list[str], what: str) -> None:
        """When `ident` is not in `table` yet, wait until its newest message in the stream is applied."""
        with self.db.reader.connect() as conn, lean_reads(conn) as (reads, cursor):
            if reads.exists(cursor, table, ident):  # one indexed read: quicker than a thread hop
                return
        newest = max(await asyncio.gather(*(self._newest(subject) for subject in subjects)))
        if newest > 0:
            await self.reach(newest, what)

    async def _newest(self, subject: str) -> int:
        try:
            # Not a direct get: any replica answers those, a follower too, which may not have the
            # message yet; the stream's leader has every message it acknowledged.
            return (await self.js.get_last_msg(STREAM, subject)).seq or 0
        except NoMessageError:
            return 0
        except (nats.errors.Error, TimeoutError) as exc:
            raise queue_unavailable(exc) from exc


class FreshnessMiddleware(ASGIMiddleware):
    """Applies `Freshness` before the handler and stamps X-Jobcast-Seq on the response (after auth:
    an unauthenticated request costs no lookup)."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Wait as the request asks (see the module doc), then run the handler."""
        freshness: Freshness | None = Litestar.from_scope(scope).state.get("freshness")
        if freshness is None:  # the lifespan has not got that far
            await next_app(scope, receive, send)
            return
        params: dict[str, Any] = scope.get("path_params") or {}
        asked = next((value for name, value in scope["headers"] if name == SEQ_HEADER.encode()), None)
        if asked is not None:
            await freshness.asked(asked.decode(errors="replace").strip())
        if isinstance(job_id := params.get("job_id"), str):
            await freshness.missing(JOBS, job_id, job_history_subjects(job_id), f"job {job_id}")
        elif isinstance(file_id := params.get("file_id"), str):
            await freshness.missing(FILES, file_id, [files_subject(file_id)], f"file {file_id}")

        # A plain function handing back `send`'s own awaitable: no coroutine of its own per message,
        # which every frame of an SSE stream would pay.
        def stamped(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                MutableScopeHeaders(message)[SEQ_HEADER] = str(freshness.projection.applied_seq)
            return send(message)

        await next_app(scope, receive, stamped)
