"""Following jobs live: SSE, WebSocket, long-poll."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Annotated, Any

import msgspec
from litestar import Controller, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent

from app._deps import Owner, Service
from app._exceptions import NotFoundError, TooManyError
from app._jobs import JobService
from app._schemas import MAX_INT, Job, SseMessage, WsCommand
from app._sse import FollowEvents
from streams import JobStatus

_ws_commands = msgspec.json.Decoder(WsCommand)
MAX_WS_MESSAGE = 16 * 1024
"""Subscription messages are small; anything longer is refused."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
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


async def _within_quota(socket: WebSocket[Any, Any, Any], service: JobService, owner: str) -> bool:
    try:
        service.check_stream_quota(owner)
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
        service: Service,
        owner: Owner,
        last_event_id: LastEventId = None,
        after: Annotated[
            int | None, QueryParameter(ge=0, le=MAX_INT, description="Same as Last-Event-ID")
        ] = None,
    ) -> ServerSentEvent:
        """SSE: the job's history after Last-Event-ID, then live events, ending after the last."""
        await service.check_visible(job_id, owner)
        start = last_event_id if last_event_id is not None else (after or 0)
        service.check_stream_quota(owner)
        return FollowEvents(service, job_id, owner, start, headers=SSE_HEADERS)

    @get("/jobs/{job_id:str}/poll", operation_id="pollJob")
    async def poll(
        self,
        job_id: FromPath[str],
        service: Service,
        owner: Owner,
        timeout: Annotated[float, QueryParameter(ge=1, le=300)] = 30,
        current_status: FromQuery[JobStatus | None] = None,
        since: Annotated[
            int | None,
            QueryParameter(ge=0, le=MAX_INT, description="Return once an event newer than this exists"),
        ] = None,
    ) -> Job:
        """Long-poll: returns when the status differs from `current_status` (or a newer event than
        `since` exists), else at the timeout with the current state."""
        return await service.wait_change(job_id, owner, timeout, current_status, since)

    @websocket("/jobs/{job_id:str}/ws")
    async def job_socket(
        self, socket: WebSocket[Any, Any, Any], job_id: FromPath[str], service: Service, owner: Owner,
        last_event_id: Annotated[int | None, QueryParameter(ge=0, le=MAX_INT)] = None,
    ) -> None:  # fmt: skip
        """WebSocket: the same events as SSE, as JSON text frames; closes after the job ends."""
        await socket.accept()
        if not await _within_quota(socket, service, owner):
            return
        try:
            await service.get(job_id, owner)
        except NotFoundError as exc:
            await socket.send_json({"type": "error", "status_code": 404, "detail": str(exc)})
            await socket.close(code=4404, reason="job not found")
            return

        async def send_all() -> None:
            async for item in service.follow(job_id, owner, last_event_id or 0):
                if item is not None:
                    await socket.send_data(item.payload.decode())

        await self._race(socket, send_all())

    @websocket("/ws", operation_id="eventsSocket")
    async def multi_socket(self, socket: WebSocket[Any, Any, Any], service: Service, owner: Owner) -> None:
        """WebSocket: subscribe by message to job ids, or to all of the caller's jobs.

        Send `{"action": "subscribe", "job_ids": [...]}`, `{"action": "subscribe", "all": true}` or
        `{"action": "unsubscribe", ...}`; receive event envelopes and `{"type": ...}` replies.
        """
        await socket.accept()
        if not await _within_quota(socket, service, owner):
            return
        with service.hub.subscribe() as sub, service.counted_stream(owner):
            sent: dict[str, int] = {}
            replaying = asyncio.Lock()

            async def deliver(job_id: str, seq: int, payload: bytes) -> None:
                if seq > sent.get(job_id, 0):
                    sent[job_id] = seq
                    await socket.send_data(payload.decode())

            async def reader() -> None:
                while True:
                    raw = await socket.receive_data(mode="text")
                    if len(raw) > MAX_WS_MESSAGE:
                        await socket.send_json({"type": "error", "status_code": 413,
                                                "detail": f"messages are limited to {MAX_WS_MESSAGE} bytes"})  # fmt: skip
                        continue
                    try:
                        cmd = _ws_commands.decode(raw)
                    except msgspec.DecodeError as exc:
                        await socket.send_json({"type": "error", "status_code": 400, "detail": str(exc)})
                        continue
                    if cmd.action not in ("subscribe", "unsubscribe"):
                        await socket.send_json({"type": "error", "status_code": 400,
                                                "detail": "action: expected 'subscribe' or 'unsubscribe'"})  # fmt: skip
                        continue
                    if cmd.action == "unsubscribe":
                        sub.remove_jobs(cmd.job_ids)
                        if cmd.all:
                            sub.follow_owner(None)
                        await socket.send_json(
                            {"type": "unsubscribed", "job_ids": cmd.job_ids, "all": cmd.all}
                        )
                        continue
                    if cmd.all:
                        sub.follow_owner(owner)
                    known: list[str] = []
                    for job_id in cmd.job_ids:
                        try:
                            await service.get(job_id, owner)
                        except NotFoundError as exc:
                            await socket.send_json({"type": "error", "status_code": 404, "detail": str(exc),
                                                    "job_id": job_id})  # fmt: skip
                            continue
                        known.append(job_id)
                    async with replaying:  # live events wait until the history before them is out
                        sub.add_jobs(known)
                        await socket.send_json({"type": "subscribed", "job_ids": known, "all": cmd.all})
                        for job_id in known:
                            history, _ = await service.history(job_id, cmd.last_event_id or 0)
                            for row in history:
                                await deliver(job_id, row.seq, row.payload)

            async def writer() -> None:
                while True:
                    item = await sub.queue.get()
                    async with replaying:
                        if item.job_id in sub.job_ids or item.owner == sub.owner:
                            await deliver(item.job_id, item.seq, item.payload)

            tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _race(socket: WebSocket[Any, Any, Any], sender: Coroutine[Any, Any, None]) -> None:
        """Run `sender` until it ends (then close) or the client goes away (then stop it)."""
        send_task = asyncio.create_task(sender)
        watch_task = asyncio.create_task(_until_disconnect(socket))
        done, pending = await asyncio.wait({send_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if send_task in done and send_task.exception() is None:
            with contextlib.suppress(Exception):
                await socket.close(code=1000)
