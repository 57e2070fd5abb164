"""The live side of jobs: following them (app/_follow.py), long-poll, the SSE fan-out, and the
per-owner quota of open streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator

from app._exceptions import TooManyError, TooSlowError
from app._follow import Cursor, follow, live
from app._hub import Applied, Hub
from app._queries import JobQueries
from app._schemas import Job
from app._settings import Settings
from app._sse import SseFanout
from streams import TERMINAL_STATUSES as TERMINAL


class Live:
    """Open SSE, WebSocket and long-poll connections: what they follow, and how many per owner."""

    def __init__(self, settings: Settings, hub: Hub, queries: JobQueries) -> None:
        self.settings = settings
        self.hub = hub
        self.queries = queries
        self.open_streams: Counter[str] = Counter()
        """Open SSE, WebSocket and long-poll connections per owner."""
        self.sse = SseFanout(hub, settings.sse_ping_s, settings.slow_client_grace_s)
        """The job event streams' followers (`/jobs/{id}/events`)."""

    def check_stream_quota(self, owner: str | None) -> None:
        """429 before a stream opens when its owner already holds the most it may (0: no quota)."""
        quota = self.settings.max_streams_per_owner
        if quota > 0 and self.open_streams[owner or "*"] >= quota:
            raise TooManyError(
                f"too many open streams for this key ({self.settings.max_streams_per_owner}); close some first"
            )

    @contextlib.contextmanager
    def counted_stream(self, owner: str | None) -> Iterator[None]:
        """Count a stream as open for its owner while the block runs."""
        self.open_streams[owner or "*"] += 1
        try:
            yield
        finally:
            self.open_streams[owner or "*"] -= 1

    def follow(
        self, job_id: str, owner: str, after: int = 0, cut_off: asyncio.Future[None] | None = None,
        *, access: str | None,
    ) -> AsyncGenerator[Applied | None, None]:  # fmt: skip
        """The job's events after `after`: history first, then live, ending after the job ends.
        Counted in `owner`'s stream quota; ends at once unless the job is `access`'s (None: any).

        Yields None whenever nothing happened for `sse_ping_s`, so callers can send a keep-alive.
        Raises TooSlowError (after the last event yielded) once the caller has fallen more than
        the client buffer behind; `cut_off` is completed at the moment it is cut off, for a caller
        busy with a write meanwhile.
        """
        return follow(
            self.hub, self.queries, job_id, after, self.settings.sse_ping_s, cut_off, access=access,
            counted=self.counted_stream(owner),
        )  # fmt: skip

    async def wait_change(
        self, job_id: str, owner: str, timeout: float, current_status: str | None, since: int | None,
        view: Callable[[str], str] = str, *, access: str | None, positioned: bool = True,
    ) -> Job:  # fmt: skip
        """Long-poll: the job once its status differs from `current_status` (or, with `since`,
        once it has an event newer than that), else at the timeout. Statuses are compared as
        `view` maps them (e.g. `compileo_status_name`, where retrying is still running). Counted
        in `owner`'s stream quota; NotFoundError unless the job is `access`'s (None: any)."""
        self.check_stream_quota(owner)
        with self.hub.subscribe([job_id]) as sub, self.counted_stream(owner):
            job = await self.queries.get(job_id, access, positioned=positioned)
            reference = view(current_status or job.status)
            if since is not None and job.last_event_id > since:
                return job
            if since is None and (
                view(job.status) != reference or (current_status is None and job.status in TERMINAL)
            ):
                return job
            # From the job as read (older events are in it already); a job that ended may be retried.
            events = live(sub, Cursor(job.last_event_id, until_end=False), None)
            with contextlib.suppress(TimeoutError, TooSlowError):  # the answer is the job as it is now
                async with asyncio.timeout(timeout), contextlib.aclosing(events):
                    async for item in events:
                        if item is None:
                            continue
                        if (since is not None and item.seq > since) or (
                            since is None and view(item.status) != reference
                        ):
                            break
            return await self.queries.get(job_id, access, positioned=positioned)
