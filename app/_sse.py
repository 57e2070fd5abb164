"""Lean SSE fan-out: the hub hands each event's frame, encoded once, to every follower's outbox.

A follower is a small object with a bounded queue of frames; the hub appends to it and never
waits (the frames are the hub's, shared by every follower of the job). The request's own
coroutine is the follower's writer: it sends the job's history page by page, then whatever the
hub queued meanwhile, joined into one ASGI `send` per wake-up, until the job ends. A small task
per follower watches for the client going away. A follower that still has more than the client
buffer waiting when the next batch arrives (its socket is full and stays full) is cut off: its
queue is dropped, and once the write in flight is through, its stream ends with a comment naming
the Last-Event-ID to reconnect with; a client that does not take even that within the grace
period is dropped without it. One timer pings idle followers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from litestar.response import ServerSentEvent
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from app._follow import Cursor, History, Replay
from app._hub import Applied, Hub, sse_frame

if TYPE_CHECKING:
    from litestar.app import Litestar
    from litestar.background_tasks import BackgroundTask, BackgroundTasks
    from litestar.connection import Request
    from litestar.datastructures import Cookie
    from litestar.enums import MediaType
    from litestar.types import Receive, Send, TypeEncodersMap

log = logging.getLogger("jobcast.api")

PING = b": ping\r\n\r\n"


def goodbye(last: int) -> bytes:
    """The comment that ends a cut-off stream (EventSource reconnects by itself, with this id)."""
    return b": too slow, cut off; reconnect with Last-Event-ID: %d\r\n\r\n" % last


class StreamCount(Protocol):
    """Counts a stream in its owner's quota while it is open (app/_live.py's Live)."""

    def counted_stream(self, owner: str | None) -> AbstractContextManager[None]:
        """Count a stream as open for `owner` while the block runs."""
        ...


async def _until_disconnect(receive: Receive) -> None:
    # uvicorn answers `http.disconnect` once the client is gone or the response has ended.
    while (await receive())["type"] != "http.disconnect":
        pass


class SseFollower:
    """One SSE client: its ASGI `send`, the frames waiting for it, the last sequence taken."""

    __slots__ = (
        "_deadline",
        "_send",
        "_wake",
        "batch",
        "cursor",
        "cut",
        "done",
        "fanout",
        "frames",
        "job_id",
        "live",
        "ping_due",
        "queued",
        "wrote",
    )

    def __init__(self, fanout: SseFanout, job_id: str, send: Send, after: int) -> None:
        self.fanout = fanout
        self.job_id = job_id
        self._send = send
        self.cursor = Cursor(after)
        """The last sequence written (or being written) to the client, and whether it ended the job."""
        self.frames: list[tuple[int, bytes, bool]] = []
        """(seq, frame, ends the job) handed over by the hub, not yet written (a list: an empty one
        is smaller than a deque, and the writer takes them all at once)."""
        self.queued = 0
        """Bytes in `frames`."""
        self.live = False
        """The history has been sent; pings may go out."""
        self.cut = False
        """Fell too far behind: nothing more is queued, the stream ends after the write in flight."""
        self.done = False
        """The client went away (or the stream ended): the writer stops."""
        self.ping_due = False
        self.wrote = False
        """Something was written since the last keep-alive tick."""
        self.batch = 0
        """The hub's batch this follower last got events of."""
        self._wake: asyncio.Future[None] | None = None
        self._deadline: asyncio.Timeout | None = None

    def deliver(self, item: Applied, frame: bytes) -> None:
        """Take one applied event of the job (called by the hub; never blocks)."""
        if self.cut or self.done:
            return
        hub = self.fanout.hub
        if self.batch != hub.batch:  # a new batch: did the client take the earlier ones?
            self.batch = hub.batch
            if self.queued > hub.client_buffer:
                self._cut_off()
                return
        size = len(frame)
        self.frames.append((item.seq, frame, item.ends))
        self.queued += size
        hub.buffered += size
        self._wake_writer()

    def ping(self) -> None:
        """A keep-alive comment, unless something was written since the last tick."""
        if not self.wrote and self.live:
            self.ping_due = True
            self._wake_writer()
        self.wrote = False

    def gone(self, _: asyncio.Task[None]) -> None:
        """The client went away, or the response ended (the disconnect watcher's callback)."""
        self.close()

    def close(self) -> None:
        """Write nothing more (the client went away, or the stream ended); idempotent."""
        self.done = True
        self._drop_frames()
        self.fanout.detach(self)
        self._wake_writer()

    async def run(self, history: History, access: str | None) -> None:
        """Write the job's history, then its live events, until the job ends, the client goes
        away, or it falls so far behind that it is cut off."""
        try:
            async with asyncio.timeout(None) as self._deadline:
                if self.cut:  # cut off before the writer started
                    self._give_grace()
                if not await self._replay(history, access):
                    await self._write_live()
                if not self.done:
                    await self._write(goodbye(self.cursor.last) if self.cut else b"", more_body=False)
        except TimeoutError:
            if self._deadline is None or not self._deadline.expired():
                raise
            log.warning(
                "SSE follower of %s cut off and not reading; dropped without its goodbye", self.job_id
            )
        except OSError as exc:  # the connection is unusable: stop writing to it
            log.debug("SSE write to a follower of %s failed: %s", self.job_id, exc)
        finally:
            self.close()

    async def _replay(self, history: History, access: str | None) -> bool:
        """Send the stored events after the cursor, page by page; True when the stream ends after
        them (the job is gone, not `access`'s, or ended with its last event sent)."""
        replay = Replay(history, self.job_id, self.cursor.last, access)
        while not (self.done or self.cut):
            rows = await replay.page()
            if rows is None:
                return True
            if rows:
                body = b"".join(sse_frame(row.seq, row.kind, row.payload) for row in rows)
                del rows  # the ORM rows would otherwise live as long as the write
                await self._write(body, more_body=True)
                self.cursor.last = replay.last  # the page is out: live frames up to here are skipped
                if replay.more:
                    continue
            self.live = True
            return replay.finished(self.cursor.last)
        return self.done

    async def _write_live(self) -> None:
        """Write what the hub queued, joined, until the job's last event, the cut-off or the end."""
        loop = asyncio.get_running_loop()
        while not self.done:
            if self.frames:
                body, ends = self._take()
                if body:
                    await self._write(body, more_body=not ends)
                if ends:
                    self.done = True
                continue
            if self.cut:
                return
            if self.ping_due:
                self.ping_due = False
                await self._write(PING, more_body=True)
                continue
            self._wake = loop.create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    def _take(self) -> tuple[bytes, bool]:
        """The waiting frames the cursor admits (those the history had are skipped), up to the
        job's end; and whether that end is among them."""
        frames = self.frames
        self._drop_frames()
        parts: list[bytes] = []
        cursor = self.cursor
        for seq, frame, ends_job in frames:
            if cursor.admit(seq, ends_job):
                parts.append(frame)
                if cursor.ended:
                    break  # nothing after the job's end is sent
        return (parts[0] if len(parts) == 1 else b"".join(parts)), cursor.ended

    async def _write(self, body: bytes, more_body: bool) -> None:
        self.wrote = body is not PING  # a keep-alive does not put off the next one
        await self._send({"type": "http.response.body", "body": body, "more_body": more_body})

    def _cut_off(self) -> None:
        # Still attached (the hub may be iterating over this very set); the writer detaches it.
        self.cut = True
        self.fanout.hub.cut_offs += 1
        self._drop_frames()
        log.info(
            "SSE follower of %s cut off: over %d bytes behind", self.job_id, self.fanout.hub.client_buffer
        )
        self._give_grace()
        self._wake_writer()

    def _give_grace(self) -> None:
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self.fanout.grace_s)

    def _drop_frames(self) -> None:
        self.fanout.hub.buffered -= self.queued
        self.frames = []
        self.queued = 0

    def _wake_writer(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class SseFanout:
    """The process's SSE followers, and one keep-alive timer for all of them."""

    def __init__(self, hub: Hub, ping_s: float, grace_s: float = 10.0) -> None:
        self.hub = hub
        self.ping_s = ping_s
        self.grace_s = grace_s
        """How long a cut-off follower gets to take the end of its stream."""
        self.followers: set[SseFollower] = set()
        self._pinger: asyncio.Task[None] | None = None

    def attach(self, follower: SseFollower) -> None:
        """Start handing the follower its job's events (and pinging it)."""
        self.followers.add(follower)
        self.hub.add_target(follower.job_id, follower)
        if self._pinger is None:
            self._pinger = asyncio.create_task(self._ping_idle(), name="sse-pings")

    def detach(self, follower: SseFollower) -> None:
        """Stop handing it events; idempotent."""
        self.followers.discard(follower)
        self.hub.remove_target(follower.job_id, follower)

    async def close(self) -> None:
        """Stop the keep-alive timer (at shutdown)."""
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)

    async def _ping_idle(self) -> None:
        # One timer, not one per connection: a follower idle for a whole tick gets a ping, so the
        # gap between keep-alives is between one and two ticks.
        try:
            while self.followers:
                await asyncio.sleep(self.ping_s)
                for follower in list(self.followers):
                    follower.ping()
        finally:
            self._pinger = None


class _FollowResponse(ASGIStreamingResponse):
    """The ASGI side of one SSE stream: headers, history, then live frames written by the hub.

    A streaming response (public Litestar API) so that no Content-Length is sent; its body is
    written by `send_body` below (a public method of ASGIStreamingResponse), not by an iterator."""

    __slots__ = ("access", "after", "counter", "fanout", "history", "job_id", "owner")

    def __init__(
        self, fanout: SseFanout, history: History, counter: StreamCount, job_id: str, owner: str,
        access: str | None, after: int, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(iterator=(), **kwargs)
        self.fanout, self.history, self.counter = fanout, history, counter
        self.job_id, self.owner, self.access, self.after = job_id, owner, access, after

    async def send_body(self, send: Send, receive: Receive) -> None:
        """Replay the history, go live, and write until the stream ends or the client leaves."""
        self.headers.headers.clear()  # sent already; not kept for the connection's lifetime
        follower = SseFollower(self.fanout, self.job_id, send, self.after)
        self.fanout.attach(follower)  # before the history is read, so nothing falls between them
        watcher = asyncio.create_task(_until_disconnect(receive))
        watcher.add_done_callback(follower.gone)
        try:
            with self.counter.counted_stream(self.owner):
                await follower.run(self.history, self.access)
        finally:
            watcher.cancel()


class FollowEvents(ServerSentEvent):
    """SSE response for one job's events, served by the hub's lean fan-out (same wire format);
    counted in `owner`'s stream quota, ending at once unless the job is `access`'s (None: any)."""

    def __init__(
        self, fanout: SseFanout, history: History, counter: StreamCount, job_id: str, owner: str,
        access: str | None, after: int, headers: dict[str, str],
    ) -> None:  # fmt: skip
        super().__init__((), headers=headers)
        # What the lean ASGI response is built from (ServerSentEvent's own fields stay unused).
        self.follow_args = (fanout, history, counter, job_id, owner, access, after)

    def to_asgi_response(
        self,
        app: Litestar | None,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        """The lean ASGI response, with the headers Litestar's SSE response would send."""
        merged = {**headers, **self.headers} if headers is not None else self.headers
        all_cookies = [*self.cookies, *(cookies or ())]
        return _FollowResponse(
            *self.follow_args,
            background=self.background or background,
            cookies=all_cookies,
            headers=merged,
            is_head_response=is_head_response,
            media_type=self.media_type,
            status_code=self.status_code or status_code,
            encoding=self.encoding,
        )
