"""Speech routes that answer in one request (OpenAI's, whisper-asr-webservice's): the upload's job
is awaited to its end by following its events, and cancelled when the client goes away first.

Such a route stores nothing for good: once its answer is built (or it failed, or its client went
away), the uploaded input and the files its job produced are deleted. A media server sweeping its
library sends every film's audio (raw PCM: about 115 MB an hour), which would otherwise fill the
disk, as the retention sweep removes produced files only, never uploads. The job's record stays
(it is small), so operators still see what ran, and it is deleted by retention as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats.errors
from litestar import Request
from litestar.datastructures import FormMultiDict, UploadFile
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Receive

from app._commands import JobCommands
from app._exceptions import NotFoundError, StatusError, TooSlowError
from app._files import FileService
from app._languages import WHISPER_LANGUAGES
from app._live import Live
from app._schemas import Job, SubmitJob
from streams import JobcastError, JobStatus

log = logging.getLogger("jobcast.speech")

END_WAIT_S = 600.0
"""How long the clean-up after a client went away waits for its cancelled job to end (a worker
stops a running one at its next cancel check, within JOBCAST_STOP_WAIT_S) before it deletes the
job's files anyway; a file the job produces after that stays."""

_CLEANING: set[asyncio.Task[None]] = set()
"""Clean-ups still running after their request went away (kept so they are not garbage-collected)."""

_ENGLISH_ONLY_NAME = re.compile(r"[.-]en$|distil-(whisper-)?large", re.IGNORECASE)
"""faster-whisper's English-only models: `tiny.en` … `medium.en`, `distil-small.en` (`.en`, or
`-en` in a converted model's name), and distil-whisper's large models (`distil-large-v2`, `-v3`,
`-v3.5`, `Systran/faster-distil-whisper-large-v3`), which were trained on English alone."""


def english_only(model: str) -> bool:
    """Whether a model knows English alone, by its name (a path or hub id by its last part), as
    faster-whisper names its models; the model itself is not loaded."""
    return bool(_ENGLISH_ONLY_NAME.search(model.rstrip("/").rsplit("/", 1)[-1]))


def speech_refusal(model: str, language: str | None, translate: bool, remedy: str) -> str | None:
    """Why `model` cannot do this, or None: a language whisper does not know, or, for an
    English-only model, another language or a translation (it would answer in English anyway:
    a silent wrong answer). `remedy` says what the caller can do about the model."""
    if language is not None and language not in WHISPER_LANGUAGES:
        return f"language must be one of whisper's codes ({', '.join(WHISPER_LANGUAGES)}), not {language!r}"
    if not english_only(model):
        return None
    if translate:
        wanted = "translate"
    elif language is not None and language != "en":
        wanted = f"transcribe {WHISPER_LANGUAGES[language]} ({language})"
    else:
        return None
    return f"the model {model} knows English alone, so it cannot {wanted}: {remedy}"


async def close_uploads(form: FormMultiDict) -> None:
    """Close the form's spooled uploads (their temporary files go with them)."""
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            await value.close()


@contextlib.asynccontextmanager
async def ended_job(
    request: Request[Any, Any, Any],
    commands: JobCommands,
    live: Live,
    files: FileService,
    body: SubmitJob,
    owner: str,
) -> AsyncIterator[Job]:
    """Submit the job on its stored input (`body.file_id`) and give it once it has ended; it is
    cancelled when the client disconnects or this request is cancelled first. When the block is
    done (the answer built, or an error), the input and the files the job produced are deleted;
    the job's record stays."""
    job_id: str | None = None
    ended = False
    try:
        job, _ = await commands.submit(body, owner)
        job_id = job.id
        job = await _until_ended(request, live, job_id, owner)
        ended = True
        yield job
    finally:
        cleaning = asyncio.create_task(
            _clean_up(commands, live, files, owner, body.file_id, job_id, not ended)
        )
        _CLEANING.add(cleaning)
        cleaning.add_done_callback(_CLEANING.discard)
        await asyncio.shield(cleaning)


async def _until_ended(request: Request[Any, Any, Any], live: Live, job_id: str, owner: str) -> Job:
    """The job once it has ended; StatusError when the client disconnects first."""
    waiting = asyncio.create_task(_ended(live, job_id, owner))
    gone = asyncio.create_task(_disconnected(request.receive))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            raise StatusError("the client disconnected; the job was cancelled")
        return waiting.result()
    finally:
        for task in (waiting, gone):
            task.cancel()
        await asyncio.gather(waiting, gone, return_exceptions=True)


async def _ended(live: Live, job_id: str, owner: str) -> Job:
    """The job once it has ended, awaited on its events (a retried attempt is followed too)."""
    after = 0
    while True:
        with contextlib.suppress(TooSlowError):  # fell behind (a starved loop): follow again from `after`
            async for applied in live.follow(job_id, owner, after, access=owner):
                if applied is not None:
                    after = applied.seq
        job = await live.queries.get(job_id, owner)
        if JobStatus(job.status).terminal:
            return job


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (the body is read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _clean_up(
    commands: JobCommands,
    live: Live,
    files: FileService,
    owner: str,
    file_id: str | None,
    job_id: str | None,
    cancel: bool,
) -> None:
    """With `cancel` (the client went away), cancel the job and wait until it has ended, so its
    worker has let go of it; then delete its input and the files it produced. A failure is
    logged: the answer stands."""
    try:
        if job_id is not None and cancel:
            with contextlib.suppress(JobcastError):  # ended meanwhile: nothing to cancel
                await commands.cancel(
                    job_id, owner, reason="the client went away before the transcription ended"
                )
            try:
                async with asyncio.timeout(END_WAIT_S):
                    await _ended(live, job_id, owner)
            except TimeoutError:
                log.warning(
                    "job %s did not end within %.0f s of its cancel; its files are deleted now",
                    job_id, END_WAIT_S, extra={"job_id": job_id},
                )  # fmt: skip
        if file_id is not None:
            with contextlib.suppress(NotFoundError):
                await files.delete(file_id, owner)
        if job_id is not None:
            await files.delete_produced([job_id])
    except (JobcastError, nats.errors.Error, TimeoutError) as exc:  # NATS away: the files stay, logged
        log.warning(
            "could not delete the input %s and the outputs of job %s of a speech request: %s",
            file_id, job_id, exc, extra={"job_id": job_id},
        )  # fmt: skip


async def output_text(files: FileService, job: Job, owner: str, suffix: str) -> str:
    """The text of the job's output file with this suffix."""
    outputs = (job.result or {}).get("outputs") or []
    for output in outputs:
        if str(output.get("name", "")).endswith(suffix):
            _, path = await files.local_copy(str(output["file_id"]), owner)
            return await anyio.Path(path).read_text(encoding="utf-8")
    raise StatusError(f"job {job.id} produced no {suffix} file", HTTP_500_INTERNAL_SERVER_ERROR)


__all__ = ["close_uploads", "ended_job", "english_only", "output_text", "speech_refusal"]
