"""Following jobs live: SSE, WebSocket, long-poll."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

import msgspec
from litestar import Controller, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent

from app._deps import Access, LiveDep, Owner
from app._exceptions import NotFoundError, TooManyError, TooSlowError, log_unexpected
from app._follow import Cursor, Replay, owner_pages
from app._hub import Subscription
from app._live import Live
from app._schemas import MAX_INT, Job, SseMessage, WsCommand
from app._sse import FollowEvents
from app.controllers.jobs import PollTimeout
from streams import JobStatus

log = logging.getLogger("jobcast.api")

_ws_commands = msgspec.json.Decoder(WsCommand)
MAX_WS_MESSAGE = 16 * 1024
"""Subscription messages are small; anything longer is refused."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLOSE_TOO_SLOW = 4008
"""WebSocket close code for a client cut off for falling too far behind (reason: where to resume)."""
SSE_RESPONSES = {
    200: ResponseSpec(
        data_container=SseMessage, media_type="text/event-stream", generate_examples=False,
        description="Server-Sent Events: `id:`, `event:` and `data:` (JSON) lines, until the job ends",
    )
}  # fmt: skip
"""How an SSE route documents its answer (Litestar would say JSON)."""

LastEventId = Annotated[
    int | None,
    HeaderParameter(
        name="Last-Event-ID", ge=0, le=MAX_INT, description="Resume after this event id", required=False
    ),
]


async def _within_quota(socket: WebSocket[Any, Any, Any], live: Live, owner: str) -> bool:
    try:
        live.check_stream_quota(owner)
    except TooManyError as exc:
        await socket.send_json({"type": "error", "status_code": 429, "detail": str(exc)})
        await socket.close(code=4429, reason="too many streams")
        return False
    return True


async def _until_disconnect(socket: WebSocket[Any, Any, Any]) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await socket.receive_data(mode="text")


class LiveController(Controller):
    """Live views of jobs."""

    path = "/api/v1"
    tags = ["live"]

    @get("/jobs/{job_id:str}/events", operation_id="streamJobEvents", responses=SSE_RESPONSES)
    async def events(
        self,
        job_id: FromPath[str],
        live: LiveDep,
        owner: Owner,
        access: Access,
        last_event_id: LastEventId = None,
        after: Annotated[
            int | None, QueryParameter(ge=0, le=MAX_INT, description="Same as Last-Event-ID")
        ] = None,
    ) -> ServerSentEvent:
        """SSE: the job's history after Last-Event-ID, then live events, ending after the last."""
        await live.queries.check_visible(job_id, access)
        start = last_event_id if last_event_id is not None else (after or 0)
        live.check_stream_quota(owner)
        return FollowEvents(live.sse, live.queries, live, job_id, owner, access, start, headers=SSE_HEADERS)

    @get("/jobs/{job_id:str}/poll", operation_id="pollJob")
    async def poll(
        self,
        job_id: FromPath[str],
        live: LiveDep,
        owner: Owner,
        access: Access,
        timeout: PollTimeout = 30,
        current_status: FromQuery[JobStatus | None] = None,
        since: Annotated[
            int | None,
            QueryParameter(ge=0, le=MAX_INT, description="Return once an event newer than this exists"),
        ] = None,
    ) -> Job:
        """Long-poll: returns when the status differs from `current_status` (or a newer event than
        `since` exists), else at the timeout with the current state."""
        return await live.wait_change(job_id, owner, timeout, current_status, since, access=access)

    @websocket("/jobs/{job_id:str}/ws")
    async def job_socket(
        self, socket: WebSocket[Any, Any, Any], job_id: FromPath[str], live: LiveDep, owner: Owner,
        access: Access, last_event_id: Annotated[int | None, QueryParameter(ge=0, le=MAX_INT)] = None,
    ) -> None:  # fmt: skip
        """WebSocket: the same events as SSE, as JSON text frames; closes after the job ends (1000),
        or with 4008 when the client falls too far behind (the reason names the last_event_id to
        reconnect with)."""
        await socket.accept()
        if not await _within_quota(socket, live, owner):
            return
        try:
            await live.queries.get(job_id, access)
        except NotFoundError as exc:
            await socket.send_json({"type": "error", "status_code": 404, "detail": str(exc)})
            await socket.close(code=4404, reason="job not found")
            return
        cut_off: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def send_all() -> None:
            async for item in live.follow(job_id, owner, last_event_id or 0, cut_off, access=access):
                if item is not None:
                    await socket.send_data(item.payload.decode())

        send_task = asyncio.create_task(send_all())
        watch_task = asyncio.create_task(_until_disconnect(socket))
        try:
            await asyncio.wait({send_task, watch_task, cut_off}, return_when=asyncio.FIRST_COMPLETED)
            if cut_off.done():
                await _close_cut_off(socket, [send_task], {watch_task}, live.settings.slow_client_grace_s)
            elif send_task.done() and send_task.exception() is None:
                with contextlib.suppress(Exception):
                    await socket.close(code=1000)
        finally:
            await _cancel(send_task, watch_task)
            await _log_failures(socket, send_task)

    @websocket("/ws", operation_id="eventsSocket")
    async def multi_socket(
        self, socket: WebSocket[Any, Any, Any], live: LiveDep, owner: Owner, access: Access
    ) -> None:
        """WebSocket: subscribe by message to job ids (an admin's: any owner's), or to all of the
        caller's jobs.

        Send `{"action": "subscribe", "job_ids": [...]}`, `{"action": "subscribe", "all": true}`
        (either with `"last_event_id": N` to replay what came after N first) or
        `{"action": "unsubscribe", ...}`; receive event envelopes and `{"type": ...}` replies. A
        client that falls too far behind is closed with 4008; the reason names the last_event_id
        to subscribe again with.
        """
        await socket.accept()
        if not await _within_quota(socket, live, owner):
            return
        with live.hub.subscribe() as sub, live.counted_stream(owner):
            sub.cut_off = asyncio.get_running_loop().create_future()
            feed = _Feed(socket, live, owner, sub, access)
            tasks = [asyncio.create_task(feed.read_commands()), asyncio.create_task(feed.write_live())]
            try:
                await asyncio.wait([*tasks, sub.cut_off], return_when=asyncio.FIRST_COMPLETED)
                if sub.cut_off.done():
                    reader, writer = tasks
                    await _cancel(reader)  # no more commands, nor the rest of a replay
                    await _close_cut_off(
                        socket, [writer], set(), live.settings.slow_client_grace_s, feed.replay_floor
                    )
            finally:
                await _cancel(*tasks)
                await _log_failures(socket, *tasks)


class _Feed:
    """One /api/v1/ws connection: its subscription commands, replays and live events."""

    def __init__(
        self, socket: WebSocket[Any, Any, Any], live: Live, owner: str, sub: Subscription,
        access: str | None,
    ) -> None:  # fmt: skip
        self.socket, self.live, self.owner, self.sub = socket, live, owner, sub
        self.access = access
        """Whose jobs it may follow by id: the caller's, or any owner's (None) for an admin."""
        self.cursors: dict[str, Cursor] = {}
        """What was sent of each job subscribed by id (the keys are `sub.job_ids`); a job that ended
        stays followed, for a retry's events."""
        self.owner_replayed = 0
        """The all-jobs feed's last replay covered the events up to this sequence."""
        self.replay_floor: int | None = None
        """While a replay runs: every event up to this sequence of what it replays has been sent."""
        self.replaying = asyncio.Lock()
        """Live events wait while a replay sends the history before them."""

    async def read_commands(self) -> None:
        """Handle subscribe / unsubscribe messages until the client goes away."""
        socket, sub = self.socket, self.sub
        while True:
            raw = await socket.receive_data(mode="text")
            if len(raw) > MAX_WS_MESSAGE:
                await self._error(413, f"messages are limited to {MAX_WS_MESSAGE} bytes")
                continue
            try:
                cmd = _ws_commands.decode(raw)
            except msgspec.DecodeError as exc:
                await self._error(400, str(exc))
                continue
            if cmd.action not in ("subscribe", "unsubscribe"):
                await self._error(400, "action: expected 'subscribe' or 'unsubscribe'")
                continue
            if cmd.action == "unsubscribe":
                sub.remove_jobs(cmd.job_ids)
                for job_id in cmd.job_ids:
                    self.cursors.pop(job_id, None)
                if cmd.all:
                    sub.follow_owner(None)
                await socket.send_json({"type": "unsubscribed", "job_ids": cmd.job_ids, "all": cmd.all})
                continue
            await self._subscribe(cmd)

    async def _subscribe(self, cmd: WsCommand) -> None:
        socket, sub, live = self.socket, self.sub, self.live
        limit = live.settings.ws_max_jobs
        if len(sub.job_ids | set(cmd.job_ids)) > limit:
            await self._error(429, f"a socket may follow at most {limit} job ids; subscribe to all instead")
            return
        known: list[str] = []
        for job_id in cmd.job_ids:
            try:
                await live.queries.get(job_id, self.access)
            except NotFoundError as exc:
                await socket.send_json({"type": "error", "status_code": 404, "detail": str(exc),
                                        "job_id": job_id})  # fmt: skip
                continue
            known.append(job_id)
        after = cmd.last_event_id or 0
        async with self.replaying:  # live events wait until the history before them is out
            if cmd.all:
                sub.follow_owner(self.owner)
            for job_id in known:
                self.cursors.setdefault(job_id, Cursor(0, until_end=False))
            sub.add_jobs(known)
            await socket.send_json({"type": "subscribed", "job_ids": known, "all": cmd.all})
            if cmd.last_event_id is None and not known:
                return
            self.replay_floor = after
            if cmd.all and cmd.last_event_id is not None:
                await self._replay_owner(after)
            for job_id in known:
                await self._replay_job(job_id, after)
            self.replay_floor = None

    async def _replay_owner(self, after: int) -> None:
        """Every event of the caller's jobs after `after`, in stream order, a page at a time."""
        async for rows in owner_pages(self.live.queries, self.owner, after):
            for row in rows:
                await self._send(row.job_id, row.seq, row.payload)
                self.replay_floor = row.seq - 1
            if rows:
                after = rows[-1].seq
            self.replay_floor = self.owner_replayed = after

    async def _replay_job(self, job_id: str, after: int) -> None:
        """The stored events of one job after `after`, a page at a time."""
        replay = Replay(self.live.queries, job_id, after)
        while replay.more:
            for row in await replay.page() or ():
                await self._send(job_id, row.seq, row.payload)

    async def write_live(self) -> None:
        """Send the live events of what is subscribed; raises TooSlowError once cut off."""
        sub = self.sub
        while True:
            item = await sub.get()
            async with self.replaying:
                if item.job_id in self.cursors:
                    await self._send(item.job_id, item.seq, item.payload)
                elif item.owner == sub.owner and item.seq > self.owner_replayed:
                    await self.socket.send_data(item.payload.decode())

    async def _send(self, job_id: str, seq: int, payload: bytes) -> None:
        """Send an event once: a job subscribed by id skips what it was sent already."""
        cursor = self.cursors.get(job_id)
        if cursor is not None and not cursor.admit(seq, ends=False):
            return
        await self.socket.send_data(payload.decode())

    async def _error(self, status: int, detail: str) -> None:
        await self.socket.send_json({"type": "error", "status_code": status, "detail": detail})


async def _close_cut_off(
    socket: WebSocket[Any, Any, Any],
    senders: list[asyncio.Task[None]],
    watchers: set[asyncio.Task[None]],
    grace_s: float,
    floor: int | None = None,
) -> None:
    """Close a socket whose client fell too far behind with 4008 and where to resume, once the
    write in flight is through; within `grace_s`, or the connection is dropped without it."""
    try:
        async with asyncio.timeout(grace_s):
            # the sender ends with TooSlowError once its write in flight is through
            await asyncio.wait([*senders, *watchers], return_when=asyncio.FIRST_COMPLETED)
            error = next(
                (t.exception() for t in senders if t.done() and not t.cancelled() and t.exception()), None
            )
            if isinstance(error, TooSlowError):
                resume = error.resume_after if floor is None else min(error.resume_after, floor)
                await socket.close(
                    code=CLOSE_TOO_SLOW, reason=f"too slow; resume with last_event_id={resume}"
                )
    except TimeoutError:
        log.warning("WebSocket client cut off and not reading; dropped without a close frame")


async def _log_failures(socket: WebSocket[Any, Any, Any], *tasks: asyncio.Task[None]) -> None:
    """Log what a connection's task died of, with the request id, as for a failing handler: the
    handler itself returns normally, so Litestar's exception hook never sees it. A client that
    left or fell behind is no failure."""
    for task in tasks:
        if task.done() and not task.cancelled():
            exc = task.exception()
            if isinstance(exc, Exception) and not isinstance(exc, TooSlowError | WebSocketDisconnect):
                await log_unexpected(exc, socket.scope)


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
