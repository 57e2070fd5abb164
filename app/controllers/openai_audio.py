"""OpenAI-compatible speech to text: `POST /v1/audio/transcriptions` as a `transcribe` job.

The upload is stored as the caller's file, a `transcribe` job (`generate_srt` for srt and vtt)
is submitted, its end is awaited by following its events, and the result is answered in the
format OpenAI's clients expect. A client that goes away before the answer cancels its job. The
upload and the job's outputs are deleted once answered (app/_speech.py).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, MediaType, Request, Response, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_500_INTERNAL_SERVER_ERROR

from app._deps import Commands, FilesDep, LiveDep, Owner
from app._exceptions import StatusError, error_body
from app._files import FileService
from app._schemas import Job, SubmitJob
from app._speech import close_uploads, ended_job, output_text, speech_refusal
from streams import InvalidParamsError, JobcastError, JobStatus, UnknownOperationError

WHISPER_1 = "whisper-1"
"""OpenAI's model name; here it means JOBCAST_ASR_MODEL."""

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")


class OpenAIRequestError(StatusError):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, message: str, status_code: int = HTTP_400_BAD_REQUEST, param: str | None = None
    ) -> None:
        super().__init__(message, status_code)
        self.message = message
        self.param = param


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer of this route: `{"error": {...}}`, as OpenAI's clients parse it."""

    error: OpenAIErrorDetail


def error_response(
    message: str, status_code: int, param: str | None = None, headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    """An error in OpenAI's shape."""
    kind = "invalid_request_error" if status_code < HTTP_500_INTERNAL_SERVER_ERROR else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return Response(body, status_code=status_code, media_type=MediaType.JSON, headers=headers)


def to_openai_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """This route's errors, jobcast's, Litestar's and unexpected ones alike, in OpenAI's shape."""
    if isinstance(exc, InvalidParamsError | UnknownOperationError):
        return error_response(str(exc), HTTP_400_BAD_REQUEST)
    body = error_body(request, exc)
    param = exc.param if isinstance(exc, OpenAIRequestError) and body.request_id is None else None
    headers = exc.headers if isinstance(exc, HTTPException) and body.request_id is None else None
    return error_response(body.detail, body.status_code, param, headers)


ERROR_RESPONSES = {
    code: ResponseSpec(data_container=OpenAIErrorBody, description=text, generate_examples=False)
    for code, text in {
        400: "Invalid request, or the transcription failed: the message says why",
        401: "No API key, or a wrong one",
        404: "A file the job produced is gone",
        413: "Request body too large",
        429: "Too many requests or open streams for this key",
        500: "Unexpected server error: the message names its request id in the server log",
        503: "The job queue is unavailable; try again",
    }.items()
}


def _text(form: Any, name: str) -> str | None:
    """A text field of the form; None when absent or empty."""
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    text = str(value).strip()
    return text or None


def _params(form: Any, asr_model: str) -> tuple[str, dict[str, Any], str, bool, bool]:
    """From the form: the job type, its params (`whisper-1` is `asr_model`), the response format,
    and whether words and segments go into a verbose_json answer."""
    response_format = _text(form, "response_format") or "json"
    if response_format not in FORMATS:
        raise OpenAIRequestError(
            f"response_format must be one of {', '.join(FORMATS)}, not {response_format!r}",
            param="response_format",
        )
    granularities = [
        str(value).strip()
        for key in ("timestamp_granularities[]", "timestamp_granularities")
        for value in form.getall(key, [])
        if not isinstance(value, UploadFile) and str(value).strip()
    ]
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise OpenAIRequestError(
                f"timestamp_granularities must be word and/or segment, not {granularity!r}",
                param="timestamp_granularities",
            )
    temperature = _text(form, "temperature")
    if temperature is not None:  # accepted, and ignored: faster-whisper's fallback schedule decides
        try:
            float(temperature)
        except ValueError:
            raise OpenAIRequestError(
                f"temperature must be a number, not {temperature!r}", param="temperature"
            ) from None
    words = response_format == "verbose_json" and "word" in granularities
    segments = not granularities or "segment" in granularities
    named = _text(form, "model") or WHISPER_1
    model = asr_model if named == WHISPER_1 else named
    remedy = (
        "the server's JOBCAST_ASR_MODEL (what whisper-1 means) must name a multilingual model for that"
        if named == WHISPER_1
        else "name a multilingual model (e.g. small or large-v3) for that"
    )
    language = _text(form, "language")
    if (refusal := speech_refusal(model, language, False, remedy)) is not None:
        raise OpenAIRequestError(refusal, param="language")
    params: dict[str, Any] = {"model": model}
    if language is not None:
        params["language"] = language
    if (prompt := _text(form, "prompt")) is not None:
        params["initial_prompt"] = prompt
    if words:
        params["word_timestamps"] = True
    job_type = "generate_srt" if response_format in ("srt", "vtt") else "transcribe"
    return job_type, params, response_format, words, segments


async def _full_text(files: FileService, job: Job, owner: str) -> str:
    """The whole transcript: inline in the result, or from its .txt when the result cut it."""
    result = job.result or {}
    if not result.get("text_truncated"):
        return str(result.get("text", ""))
    return (await output_text(files, job, owner, ".txt")).removesuffix("\n")


def _verbose(transcript: dict[str, Any], words: bool, segments: bool) -> dict[str, Any]:
    """OpenAI's verbose_json from a transcript (the .json output of a transcribe job)."""
    found = transcript.get("segments") or []
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": transcript.get("language"),
        "duration": transcript.get("duration_s"),
        "text": transcript.get("text", ""),
    }
    if segments:
        body["segments"] = [
            {"id": index, "start": s["start"], "end": s["end"], "text": s["text"]}
            for index, s in enumerate(found)
        ]
    if words:
        body["words"] = [
            {"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
            for s in found
            for w in s.get("words") or []
        ]
    return body


class OpenAIAudioController(Controller):
    """OpenAI's audio API, speech to text."""

    path = "/v1/audio"
    tags = ["openai"]
    exception_handlers = {
        JobcastError: to_openai_error,  # OpenAIRequestError too
        HTTPException: to_openai_error,
        HTTP_500_INTERNAL_SERVER_ERROR: to_openai_error,  # any other exception
    }

    @post(
        "/transcriptions",
        status_code=200,
        operation_id="createTranscription",
        responses=ERROR_RESPONSES,
    )
    async def transcriptions(
        self, request: Request[Any, Any, Any], commands: Commands, live: LiveDep, files: FilesDep,
        owner: Owner,
    ) -> Response[Any]:  # fmt: skip
        """Speech to text in OpenAI's wire format (multipart: `file`, `model`, `language`, `prompt`,
        `response_format`, `timestamp_granularities[]`, `temperature`); `whisper-1` means the
        server's JOBCAST_ASR_MODEL (tiny.en unless configured)."""
        form = await request.form()
        upload = form.get("file")
        try:
            if not isinstance(upload, UploadFile):
                raise OpenAIRequestError("a file is required in the multipart field `file`", param="file")
            job_type, params, response_format, words, segments = _params(form, commands.settings.asr_model)
            stored = await files.upload(upload, owner)
        finally:
            await close_uploads(form)
        submitted = SubmitJob(type=job_type, params=params, file_id=stored.id)
        async with ended_job(request, commands, live, files, submitted, owner) as job:
            return await _answer(files, job, owner, response_format, words, segments)


async def _answer(
    files: FileService, job: Job, owner: str, response_format: str, words: bool, segments: bool
) -> Response[Any]:
    """The ended job's answer in `response_format` (read from its outputs, which go after it)."""
    headers = {"X-Jobcast-Job-Id": job.id}
    if job.status != JobStatus.COMPLETED:
        reason = job.error or f"the transcription job was {job.status}"
        return error_response(reason, HTTP_400_BAD_REQUEST, headers=headers)
    result = job.result or {}
    if response_format in ("srt", "vtt"):
        text = await output_text(files, job, owner, f".{response_format}")
        return Response(text, media_type=MediaType.TEXT, headers=headers)
    if response_format == "verbose_json":
        # Segments and words live only in the job's .json output, never in its (bounded) result.
        transcript = msgspec.json.decode(await output_text(files, job, owner, ".json"))
        return Response(_verbose(transcript, words, segments), media_type=MediaType.JSON, headers=headers)
    text = await _full_text(files, job, owner)
    if response_format == "text":
        return Response(f"{text}\n", media_type=MediaType.TEXT, headers=headers)
    body = {"text": text, "usage": {"type": "duration", "seconds": _seconds(result)}}
    return Response(body, media_type=MediaType.JSON, headers=headers)


def _seconds(result: dict[str, Any]) -> int:
    """Billed seconds, as OpenAI's duration usage counts them (rounded up)."""
    duration = float(result.get("duration_s") or 0)
    return int(-(-duration // 1))


__all__ = ["OpenAIAudioController"]
