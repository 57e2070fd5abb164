"""Following jobs: their stored history after a sequence, page by page, then their live events
from the hub, each sequence once, ending after the job's terminal event.

Every live view is built from these parts: SSE (app/_sse.py, which writes frames the hub pushes
into its own outbox, and so uses `Replay` and `Cursor` rather than `follow`), the Compileo status
stream, the per-job WebSocket and the speech routes (`follow`), long-poll (`live`, from the job's
current state, without the end rule) and `/api/v1/ws` (`Replay`, `owner_pages` and one `Cursor`
per job).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from app._exceptions import TooSlowError
from app._hub import Applied, Hub, Subscription
from app._queries import QUICK_PAGE
from streams import JobStatus

if TYPE_CHECKING:
    from app._db import EventRow
    from app._schemas import Job

HISTORY_PAGE = 500
"""Stored events read (and sent) at a time when a follower replays a job's history."""


class History(Protocol):
    """Where a follower reads a job's stored events (JobQueries)."""

    async def history(
        self, job_id: str, after: int, limit: int | None = None
    ) -> tuple[list[EventRow], Job | None]:
        """The job's events after `after` (the first `limit`), and the job, in one snapshot."""
        ...


class OwnerHistory(Protocol):
    """Where the all-jobs feed reads an owner's stored events (JobQueries)."""

    async def owner_history(self, owner: str, after: int, limit: int) -> list[EventRow]:
        """The first `limit` events after `after` of all of `owner`'s jobs, in stream order."""
        ...


class Cursor:
    """The one rule of every follower: pass each sequence once, in order, and (`until_end`)
    nothing after the event that ended the job."""

    __slots__ = ("ended", "last", "until_end")

    def __init__(self, last: int, until_end: bool = True) -> None:
        self.last = last
        """The last sequence passed on (or, before any, the one the follower starts after)."""
        self.until_end = until_end
        self.ended = False
        """The job's terminal event was passed on: the follower stops."""

    def admit(self, seq: int, ends: bool) -> bool:
        """True for an event to pass on (and mark passed): newer than the last, before the end."""
        if self.ended or seq <= self.last:
            return False  # already in the history, or an event of an attempt that already ended
        self.last = seq
        self.ended = ends and self.until_end
        return True


class Replay:
    """A job's stored events after a sequence, a page of HISTORY_PAGE at a time."""

    __slots__ = ("access", "history", "job", "job_id", "last", "more")

    def __init__(self, history: History, job_id: str, after: int, access: str | None = None) -> None:
        self.history, self.job_id, self.last, self.access = history, job_id, after, access
        self.job: Job | None = None
        """The job as the last page's snapshot saw it."""
        self.more = True
        """Another page may follow (none was read yet, or the last one was full)."""

    async def page(self) -> list[EventRow] | None:
        """The next page (maybe empty); None when the job is gone or not `access`'s (None: any)."""
        # The first page is short (most jobs have fewer events): it is read without a thread hop.
        limit = HISTORY_PAGE if self.job is not None else QUICK_PAGE
        rows, job = await self.history.history(self.job_id, self.last, limit)
        if job is None or (self.access is not None and job.owner != self.access):
            self.more = False
            return None
        self.job, self.more = job, len(rows) == limit
        if rows:
            self.last = rows[-1].seq
        return rows

    def finished(self, last: int) -> bool:
        """After the last page: the job has ended and nothing after `last` is to come."""
        return self.job is not None and JobStatus(self.job.status).terminal and self.job.last_event_id <= last


async def owner_pages(history: OwnerHistory, owner: str, after: int) -> AsyncIterator[list[EventRow]]:
    """Every stored event of `owner`'s jobs after `after`, in stream order, a page at a time."""
    while True:
        rows = await history.owner_history(owner, after, HISTORY_PAGE)
        full = len(rows) == HISTORY_PAGE
        if full and rows[0].seq != (cut := rows[-1].seq):
            # A child's event and its batch parent's share a sequence: a page ends between
            # sequences, so that resuming after a page's last one loses neither.
            rows = [row for row in rows if row.seq != cut]
        if rows:
            after = rows[-1].seq
        yield rows
        if not full:
            return


async def live(
    sub: Subscription, cursor: Cursor, idle_s: float | None
) -> AsyncGenerator[Applied | None, None]:
    """The subscription's events that pass `cursor`, until it ends; None after every `idle_s`
    without one (for a keep-alive). Raises TooSlowError(cursor.last) once cut off."""
    while not cursor.ended:
        try:
            async with asyncio.timeout(idle_s):
                item = await sub.get()
        except TimeoutError:
            yield None
            continue
        except TooSlowError:
            # Asked for more, so the caller is through with what came before: everything up to
            # `cursor.last` (the history read while live events piled up included).
            raise TooSlowError(cursor.last) from None
        if cursor.admit(item.seq, item.ends):
            yield item


async def follow(
    hub: Hub, history: History, job_id: str, after: int, idle_s: float,
    cut_off: asyncio.Future[None] | None = None, *, access: str | None,
    counted: AbstractContextManager[None],
) -> AsyncGenerator[Applied | None, None]:  # fmt: skip
    """The job's events after `after`: history first, then live, ending after the job ends (at
    once unless the job is `access`'s; None: any). Yields None after every `idle_s` without an
    event; raises TooSlowError once cut off (`cut_off` completes at that moment, for a caller
    busy with a write). `counted` is held while it runs (a stream quota's count)."""
    # Subscribed before the history is read, so that nothing falls between them.
    with hub.subscribe([job_id]) as sub, counted:
        sub.cut_off = cut_off
        replay = Replay(history, job_id, after, access)
        cursor = Cursor(after)
        while replay.more:
            rows = await replay.page()
            if rows is None or replay.job is None:
                return
            owner = replay.job.owner
            for row in rows:
                cursor.admit(row.seq, False)
                yield Applied(row.seq, job_id, owner, row.kind, "", False, row.payload)
        if replay.finished(cursor.last):
            return
        async with contextlib.aclosing(live(sub, cursor, idle_s)) as events:
            async for item in events:
                yield item
