"""The Compileo jobs API (seed 004): status, long-poll and a status stream, in its shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK

from app._deps import Access, Commands, LiveDep, Owner, Queries
from app._exceptions import TooSlowError
from app.controllers._compileo_shapes import (
    JobStatusView,
    StatusUpdate,
    compileo_status,
    compileo_status_name,
    compileo_update,
)
from app.controllers.jobs import PollTimeout
from app.controllers.live import SSE_HEADERS, SSE_RESPONSES
from streams import JobStatus

_encoder = msgspec.json.Encoder()


class Message(msgspec.Struct):
    """Compileo's acknowledgement body."""

    message: str


class CompileoController(Controller):
    """The Compileo jobs API: status, poll and stream under /status, cancel and restart."""

    path = "/api/v1/jobs"
    tags = ["compileo"]

    @get("/status/{job_id:str}", operation_id="getJobStatus")
    async def status(self, job_id: FromPath[str], queries: Queries, access: Access) -> JobStatusView:
        """The job's current status."""
        return compileo_status(await queries.get(job_id, access, positioned=False))

    @get("/status/{job_id:str}/poll", operation_id="pollJobStatus")
    async def poll(
        self,
        job_id: FromPath[str],
        live: LiveDep,
        owner: Owner,
        access: Access,
        timeout: PollTimeout = 30,
        current_status: FromQuery[JobStatus | None] = None,
    ) -> JobStatusView:
        """Returns as soon as the status differs from `current_status`, or at the timeout."""
        return compileo_status(
            await live.wait_change(
                job_id,
                owner,
                timeout,
                current_status,
                None,
                compileo_status_name,
                access=access,
                positioned=False,
            )
        )

    @get("/status/{job_id:str}/stream", operation_id="streamJobStatus", responses=SSE_RESPONSES)
    async def stream(
        self, job_id: FromPath[str], live: LiveDep, owner: Owner, access: Access
    ) -> ServerSentEvent:
        """SSE of status snapshots (`data:` lines only), from now until the job ends."""
        job = await live.queries.get(job_id, access, positioned=False)
        live.check_stream_quota(owner)

        async def updates() -> AsyncIterator[ServerSentEventMessage]:
            current = compileo_status(job)
            first = StatusUpdate(
                job_id=job.id, status=current.status, progress=job.progress, current_step=job.current_step,
                timestamp=job.updated_at, result=job.result if current.status == JobStatus.COMPLETED else None,
                error=job.error if current.status == JobStatus.FAILED else None,
            )  # fmt: skip
            yield ServerSentEventMessage(data=_encoder.encode(first).decode())
            try:
                async for item in live.follow(job_id, owner, job.last_event_id, access=access):
                    if item is None:
                        yield ServerSentEventMessage(comment="ping", data=None)
                        continue
                    final = await live.queries.get(job_id, access, positioned=False) if item.ends else job
                    yield ServerSentEventMessage(
                        data=_encoder.encode(compileo_update(item.payload, final)).decode()
                    )
            except TooSlowError:  # fell too far behind; reconnecting starts from the current status
                yield ServerSentEventMessage(comment="too slow, cut off; reconnect", data=None)

        return ServerSentEvent(updates(), headers=SSE_HEADERS)

    @post("/cancel/{job_id:str}", status_code=HTTP_200_OK, operation_id="cancelJobCompileo")
    async def cancel(self, job_id: FromPath[str], commands: Commands, access: Access) -> Message:
        """Cancel a running or pending job."""
        await commands.cancel(job_id, access)
        return Message(f"Job {job_id} cancelled successfully")

    @post("/restart/{job_id:str}", status_code=HTTP_200_OK, operation_id="restartJobCompileo")
    async def restart(self, job_id: FromPath[str], commands: Commands, access: Access) -> Message:
        """Restart a failed or cancelled job."""
        await commands.retry(job_id, access)
        return Message(f"Job {job_id} restarted successfully")
