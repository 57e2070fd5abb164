"""whisper-asr-webservice's API (`POST /asr`, `POST /detect-language`), as Bazarr's Whisper provider
and the Jellyfin/Plex subtitle tools built like it speak it, served by the queue.

As on the OpenAI route, the upload is stored as the caller's file, a job is submitted
(`generate_srt` for srt and vtt, `transcribe` for txt, tsv and json, `detect_language`) with the
model JOBCAST_ASR_MODEL names, its end is awaited, and the answer has upstream's shape; a client
that goes away first cancels its job. The upload and the job's outputs are deleted once answered
(app/_speech.py). With `encode=false` the body is raw 16 kHz mono s16le PCM, stored as a WAV (see
app/_wav.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec
from litestar import Controller, MediaType, Request, Response, post
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException
from litestar.params import FromQuery, QueryParameter
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from app._deps import Commands, FilesDep, LiveDep, Owner
from app._exceptions import StatusError
from app._files import FileService
from app._languages import WHISPER_LANGUAGES
from app._schemas import FileInfo, Job, SubmitJob
from app._speech import close_uploads, ended_job, output_text, speech_refusal
from app._wav import PcmTooLargeError, pcm_as_wav
from streams import JobStatus, safe_name

Output = Literal["txt", "vtt", "srt", "tsv", "json"]
Task = Literal["transcribe", "translate"]

TEXT = MediaType.TEXT
"""What upstream labels every /asr answer with, json included (Litestar adds `; charset=utf-8`)."""
ENGINE = "faster_whisper"
"""Upstream's `Asr-Engine` header for the engine jobcast runs."""
DETECTION_S = 30.0
"""Whisper detects the language from one 30 s window; raw PCM past it is not stored."""
REMEDY = "set JOBCAST_ASR_MODEL to a multilingual model (e.g. small or large-v3) for that"
"""What an operator does about a request an English-only JOBCAST_ASR_MODEL cannot serve."""

Encode = Annotated[
    bool, QueryParameter(description="false: the body is raw 16 kHz mono s16le PCM (what Bazarr sends)")
]
VideoFile = Annotated[
    str | None,
    QueryParameter(
        description="The video the audio comes from (Bazarr's `pass_video_name`): names raw PCM's stored WAV"
    ),
]


async def _store(
    request: Request[Any, Any, Any],
    files: FileService,
    owner: str,
    encode: bool,
    video_file: str | None,
    max_seconds: float | None = None,
) -> tuple[FileInfo, str]:
    """The multipart `audio_file` stored as the owner's file (raw PCM as a WAV, its first
    `max_seconds` when given), and the name the client gave it."""
    form = await request.form()
    try:
        upload = form.get("audio_file")
        if not isinstance(upload, UploadFile):
            raise StatusError("an audio file is required in the multipart field `audio_file`")
        filename = upload.filename or "audio_file"
        if encode:
            return await files.upload(upload, owner), filename
        name = Path(safe_name(video_file or filename, default="audio_file")).stem + ".wav"
        try:
            wav = pcm_as_wav(upload.file, max_seconds)
        except PcmTooLargeError as exc:
            raise StatusError(str(exc), HTTP_413_REQUEST_ENTITY_TOO_LARGE) from None
        return await files.save(wav, name, owner), filename
    finally:
        await close_uploads(form)


class DetectedLanguage(msgspec.Struct, kw_only=True):
    """The answer of `/detect-language`, as upstream's."""

    detected_language: str
    """Whisper's name of the language, e.g. `english`."""
    language_code: str
    """Its code, e.g. `en`."""
    confidence: float
    """The model's probability for it; an English-only model knows one language, so it answers
    english with 1 (faster-whisper's own answer for such a model)."""


def _completed(job: Job) -> Job:
    """The job, if it completed; a 400 with the worker's reason (as jobcast's errors are) if not."""
    if job.status == JobStatus.COMPLETED:
        return job
    reason = job.error or f"the job was {job.status}"
    raise ClientException(reason, status_code=HTTP_400_BAD_REQUEST, headers=_job_header(job))


def _job_header(job: Job) -> dict[str, str]:
    return {"X-Jobcast-Job-Id": job.id}


def render(transcript: dict[str, Any], output: Output) -> str:
    """A transcript as upstream writes txt (a line per segment), tsv (milliseconds) and json (the
    whisper result: `text`, `segments`, `language`)."""
    segments: list[dict[str, Any]] = transcript.get("segments") or []
    if output == "txt":
        return "".join(f"{s['text'].strip()}\n" for s in segments)
    if output == "tsv":
        rows = [
            f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n"
            for s in segments
        ]
        return "start\tend\ttext\n" + "".join(rows)
    result = {
        "text": transcript.get("text", ""),
        "segments": [
            {"id": index, "start": s["start"], "end": s["end"], "text": s["text"], "words": s.get("words")}
            for index, s in enumerate(segments, 1)
        ],
        "language": transcript.get("language"),
    }
    return msgspec.json.encode(result).decode()


class WhisperAsrController(Controller):
    """whisper-asr-webservice's endpoints."""

    path = "/"
    tags = ["whisper-asr-webservice"]

    @post("/asr", status_code=200, operation_id="asr", media_type=TEXT)
    async def asr(
        self,
        request: Request[Any, Any, Any],
        commands: Commands,
        live: LiveDep,
        files: FilesDep,
        owner: Owner,
        encode: Encode = True,
        task: FromQuery[Task] = "transcribe",
        language: FromQuery[str | None] = None,
        initial_prompt: FromQuery[str | None] = None,
        vad_filter: FromQuery[bool] = False,
        word_timestamps: FromQuery[bool] = False,
        diarize: FromQuery[bool] = False,
        min_speakers: FromQuery[int | None] = None,
        max_speakers: FromQuery[int | None] = None,
        output: FromQuery[Output] = "txt",
        video_file: VideoFile = None,
    ) -> Response[str]:
        """Speech to text (multipart `audio_file`) as txt, vtt, srt, tsv or json, the way
        whisper-asr-webservice answers; `min_speakers`/`max_speakers` are accepted and unused, as
        upstream's faster_whisper engine does; `diarize` is refused: jobcast does not diarize."""
        del min_speakers, max_speakers
        if diarize:
            raise StatusError(
                "diarize is not supported: jobcast's faster-whisper does no speaker diarization"
            )
        model = commands.settings.asr_model
        if (refusal := speech_refusal(model, language, task == "translate", REMEDY)) is not None:
            raise StatusError(refusal)
        params: dict[str, Any] = {"model": model, "task": task, "vad_filter": vad_filter}
        if language is not None:
            params["language"] = language
        if initial_prompt:
            params["initial_prompt"] = initial_prompt
        subtitles = output in ("srt", "vtt")
        if not subtitles:  # generate_srt keeps its own default (on): word times split long cues
            params["word_timestamps"] = word_timestamps
        stored, filename = await _store(request, files, owner, encode, video_file)
        submitted = SubmitJob(
            type="generate_srt" if subtitles else "transcribe", params=params, file_id=stored.id
        )
        async with ended_job(request, commands, live, files, submitted, owner) as ended:
            job = _completed(ended)
            if subtitles:
                body = await output_text(files, job, owner, f".{output}")
            else:
                body = render(msgspec.json.decode(await output_text(files, job, owner, ".json")), output)
        headers = {
            "Asr-Engine": ENGINE,
            "Content-Disposition": f'attachment; filename="{quote(filename)}.{output}"',
            **_job_header(job),
        }
        return Response(body, media_type=TEXT, headers=headers)

    @post("/detect-language", status_code=200, operation_id="detectLanguage")
    async def detect_language(
        self,
        request: Request[Any, Any, Any],
        commands: Commands,
        live: LiveDep,
        files: FilesDep,
        owner: Owner,
        encode: Encode = True,
        video_file: VideoFile = None,
    ) -> Response[DetectedLanguage]:
        """The language spoken in the first 30 s of the multipart `audio_file`:
        `{detected_language, language_code, confidence}` (an English-only model answers english)."""
        stored, _ = await _store(request, files, owner, encode, video_file, DETECTION_S)
        params = {"model": commands.settings.asr_model}
        submitted = SubmitJob(type="detect_language", params=params, file_id=stored.id)
        async with ended_job(request, commands, live, files, submitted, owner) as ended:
            job = _completed(ended)
        result = job.result or {}
        code = str(result.get("language"))
        body = DetectedLanguage(
            detected_language=WHISPER_LANGUAGES.get(code, code),
            language_code=code,
            confidence=float(result.get("language_probability") or 0.0),
        )
        return Response(body, media_type=MediaType.JSON, headers=_job_header(job))


__all__ = ["DetectedLanguage", "WhisperAsrController", "render"]
