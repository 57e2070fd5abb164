"""Speech routes that answer in one request (OpenAI's, whisper-asr-webservice's): the upload's job
is awaited to its end by following its events, and cancelled when the client goes away first."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
from litestar import Request
from litestar.datastructures import FormMultiDict, UploadFile
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Receive

from app._exceptions import StatusError, TooSlowError
from app._files import FileService
from app._jobs import JobService
from app._schemas import Job, SubmitJob
from streams import JobcastError, JobStatus

_CANCELLING: set[asyncio.Task[None]] = set()
"""Cancels still running after their request went away (kept so they are not garbage-collected)."""


async def close_uploads(form: FormMultiDict) -> None:
    """Close the form's spooled uploads (their temporary files go with them)."""
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            await value.close()


async def run_to_end(
    request: Request[Any, Any, Any], service: JobService, body: SubmitJob, owner: str
) -> Job:
    """Submit the job and return it once it has ended; it is cancelled when the client disconnects
    or this request is cancelled first."""
    job, _ = await service.submit(body, owner)
    waiting = asyncio.create_task(_ended(service, job.id, owner))
    gone = asyncio.create_task(_disconnected(request.receive))
    ended = False
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            raise StatusError("the client disconnected; the job was cancelled")
        job = waiting.result()
        ended = True
        return job
    finally:
        for task in (waiting, gone):
            task.cancel()
        await asyncio.gather(waiting, gone, return_exceptions=True)
        if not ended:
            cancelling = asyncio.create_task(_cancel(service, job.id, owner))
            _CANCELLING.add(cancelling)
            cancelling.add_done_callback(_CANCELLING.discard)
            await asyncio.shield(cancelling)


async def _ended(service: JobService, job_id: str, owner: str) -> Job:
    """The job once it has ended, awaited on its events (a retried attempt is followed too)."""
    after = 0
    while True:
        with contextlib.suppress(TooSlowError):  # fell behind (a starved loop): follow again from `after`
            async for applied in service.follow(job_id, owner, after):
                if applied is not None:
                    after = applied.seq
        job = await service.get(job_id, owner)
        if JobStatus(job.status).terminal:
            return job


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (the body is read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel(service: JobService, job_id: str, owner: str) -> None:
    with contextlib.suppress(JobcastError):
        await service.cancel(job_id, owner, reason="the client went away before the transcription ended")


async def output_text(files: FileService, job: Job, owner: str, suffix: str) -> str:
    """The text of the job's output file with this suffix."""
    outputs = (job.result or {}).get("outputs") or []
    for output in outputs:
        if str(output.get("name", "")).endswith(suffix):
            _, path = await files.local_copy(str(output["file_id"]), owner)
            return await anyio.Path(path).read_text(encoding="utf-8")
    raise StatusError(f"job {job.id} produced no {suffix} file", HTTP_500_INTERNAL_SERVER_ERROR)


__all__ = ["close_uploads", "output_text", "run_to_end"]
