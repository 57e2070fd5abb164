"""Lean SSE fan-out: the hub writes each event's frame, encoded once, straight to every follower.

A follower is not a queue, a generator and a task: it is a small object the hub hands frames to.
Frames handed over during one pass of the event loop are joined and written with one ASGI `send`
per follower, driven to completion on the spot (uvicorn's `send` only waits when the socket's
buffer is full; then, and only then, a task finishes that write and later frames wait in order).
The request's own coroutine just waits for the client to go away. One timer pings idle followers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from litestar.response import ServerSentEvent
from litestar.response.base import ASGIResponse

from app._hub import Applied, Hub, sse_frame
from streams import JobStatus

if TYPE_CHECKING:
    from litestar.app import Litestar
    from litestar.background_tasks import BackgroundTask, BackgroundTasks
    from litestar.connection import Request
    from litestar.datastructures import Cookie
    from litestar.enums import MediaType
    from litestar.types import Receive, Send, TypeEncodersMap

    from app._jobs import JobService

log = logging.getLogger("jobcast.api")

PING = b": ping\r\n\r\n"


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


async def _finish(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive a started coroutine that had to wait to its end, as a Task would have."""
    try:
        while True:
            if waiting is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                # What Task.__step does with a yielded future before it waits on it.
                waiting._asyncio_future_blocking = False
                try:
                    await waiting
                except BaseException:
                    if not waiting.done() or waiting.cancelled():
                        raise  # this task is being cancelled
                    # else the coroutine gets the future's exception when it resumes
            waiting = coro.send(None)
    except StopIteration:
        pass
    finally:
        coro.close()


class SseFollower:
    """One SSE client's place in the hub: its ASGI `send`, the last sequence sent, frames not yet written."""

    __slots__ = (
        "_send",
        "blocked",
        "done",
        "early",
        "ending",
        "fanout",
        "job_id",
        "last",
        "pending",
        "wrote",
    )

    def __init__(self, fanout: SseFanout, job_id: str, send: Send, after: int) -> None:
        self.fanout = fanout
        self.job_id = job_id
        self._send = send
        self.last = after
        self.pending: list[bytes] = []
        self.early: list[tuple[Applied, bytes]] | None = []
        """Live events that arrive while the history is read; None once it has been sent."""
        self.ending = False
        """The job's last event is in `pending`: the stream ends after it."""
        self.done = False
        """The stream has ended (or the connection failed); nothing more is written."""
        self.blocked = False
        """A write is waiting for the socket; later frames stay in `pending` until it is done."""
        self.wrote = False
        """Something was written since the last keep-alive tick."""

    def deliver(self, item: Applied, frame: bytes) -> None:
        """Take one applied event of the job (called by the hub; never blocks)."""
        if self.early is not None:
            self.early.append((item, frame))
            return
        if self.ending or item.seq <= self.last:
            return
        self.last = item.seq
        if not self.pending:
            self.fanout.mark(self)
        self.pending.append(frame)
        if item.ends:
            self.ending = True

    def start(self, history: list[bytes], last: int, finished: bool) -> None:
        """Send the replayed history, then go live (or end, when the job already ended)."""
        early, self.early = self.early or [], None
        self.last = last
        self.pending.extend(history)
        if finished:
            self.ending = True
        else:
            for item, frame in early:
                self.deliver(item, frame)
        self.flush()

    def flush(self) -> None:
        """Write the pending frames (and the end of the stream after the last event) in one send."""
        if self.blocked or self.done or not (self.pending or self.ending):
            return
        body = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        self.wrote = True
        if self.ending:
            self.done = True
            self.fanout.detach(self)
        self._write(body, more_body=not self.done)

    def ping(self) -> None:
        """A keep-alive comment, unless something was written since the last tick."""
        if not self.wrote and not self.blocked and not self.done and self.early is None:
            self._write(PING, more_body=True)
        self.wrote = False

    def close(self) -> None:
        """Write nothing more (the client went away, or the request ended)."""
        self.done = True
        self.fanout.detach(self)

    def _write(self, body: bytes, more_body: bool) -> None:
        try:
            sent = self._send({"type": "http.response.body", "body": body, "more_body": more_body})
            coro = sent if isinstance(sent, Coroutine) else _awaited(sent)
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception as exc:  # the connection is unusable: stop writing to it, keep the others going
            log.debug("SSE write to a follower of %s failed: %s", self.job_id, exc)
            self.close()
            return
        self.blocked = True
        self.fanout.background(self._drain(coro, waiting))

    async def _drain(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        try:
            await _finish(coro, waiting)
        except Exception as exc:
            log.debug("SSE write to a follower of %s failed: %s", self.job_id, exc)
            self.close()
            return
        except BaseException:  # cancelled (shutdown): this follower gets nothing more
            self.close()
            raise
        self.blocked = False
        self.flush()


class SseFanout:
    """The process's SSE followers: joined writes after each hub pass, one keep-alive timer for all."""

    def __init__(self, hub: Hub, ping_s: float) -> None:
        self.hub = hub
        self.ping_s = ping_s
        self.followers: set[SseFollower] = set()
        self._dirty: list[SseFollower] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
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

    def mark(self, follower: SseFollower) -> None:
        """The follower has frames to write: write them once the hub's current pass is over."""
        self._dirty.append(follower)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a follower's slow write as a task, kept referenced until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop the keep-alive timer and unfinished writes (at shutdown)."""
        tasks = [*self._tasks, *([self._pinger] if self._pinger else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for follower in dirty:
            follower.flush()

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


class _FollowResponse(ASGIResponse):
    """The ASGI side of one SSE stream: headers, history, then live frames written by the hub."""

    __slots__ = ("after", "job_id", "owner", "service")
    _should_set_content_length = False

    def __init__(
        self, service: JobService, job_id: str, owner: str | None, after: int, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.service, self.job_id, self.owner, self.after = service, job_id, owner, after

    async def send_body(self, send: Send, receive: Receive) -> None:
        """Replay the history, go live, and wait until the stream ends or the client leaves."""
        self.headers.headers.clear()  # sent already; not kept for the connection's lifetime
        service, fanout = self.service, self.service.sse
        follower = SseFollower(fanout, self.job_id, send, self.after)
        fanout.attach(follower)  # before the history is read, so nothing falls between them
        try:
            with service.counted_stream(self.owner):
                rows, job = await service.history(self.job_id, self.after)
                if job is None or (self.owner is not None and job.owner != self.owner):
                    follower.start([], self.after, finished=True)
                else:
                    history = [sse_frame(row.seq, row.kind, row.payload) for row in rows]
                    last = rows[-1].seq if rows else self.after
                    del rows  # the ORM rows would otherwise live as long as the connection
                    finished = JobStatus(job.status).terminal and job.last_event_id <= last
                    follower.start(history, last, finished)
                    del history, job
                # uvicorn answers `http.disconnect` once the client is gone or the response ended.
                while (await receive())["type"] != "http.disconnect":
                    pass
        finally:
            follower.close()


class FollowEvents(ServerSentEvent):
    """SSE response for one job's events, served by the hub's lean fan-out (same wire format)."""

    def __init__(
        self, service: JobService, job_id: str, owner: str | None, after: int, headers: dict[str, str]
    ) -> None:
        super().__init__((), headers=headers)
        self._follow = (service, job_id, owner, after)

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
            *self._follow,
            background=self.background or background,
            cookies=all_cookies,
            headers=merged,
            is_head_response=is_head_response,
            media_type=self.media_type,
            status_code=self.status_code or status_code,
            encoding=self.encoding,
        )
