"""Operation specs: each job type's pool, params schema, retry default and run-time limit.

The API validates params against these before publishing, so it needs no worker code;
workers map the same type names to handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from streams._config import Pool
from streams._egress import LlmEndpoints
from streams._errors import InvalidParamsError, UnknownOperationError
from streams._params import (
    ConvertParams,
    DetectLanguageParams,
    FixSrtParams,
    GenerateSrtParams,
    NoopParams,
    TranscribeParams,
    TranslateSrtParams,
)

P = TypeVar("P", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """What the API needs to know about an operation."""

    name: str
    pool: Pool
    params: type[msgspec.Struct]
    description: str
    max_attempts: int = 3
    """Default number of runs before a transiently failing job is failed for good."""
    needs_file: bool = False
    """The job names its input by `file_id`."""
    calls_llm: bool = False
    """The operation sends the worker's LLM key to its params' `base_url`, so that URL must be
    one the operator allows (`LlmEndpoints`)."""
    timeout_s: float = 3600.0
    """Default run-time limit of one attempt, in seconds (a job's `timeout_s` replaces it)."""
    timeout_per_media_s: float = 0.0
    """Added to `timeout_s` per second of input media, once the worker has probed it: a
    ten-hour recording gets more time than a ten-second clip. Unused when the job sets its own."""
    timeout_transient: bool = False
    """A timed-out attempt is retried (up to `max_attempts`) instead of failing the job."""
    input_kinds: tuple[str, ...] = ()
    """The file kinds (name suffixes without the dot) the operation reads; empty: audio or video
    (streams.MEDIA: any file but the documents operations write), or none needed. Where it is
    given, a file of another kind cannot be the operation's input."""
    main_output: str | None = None
    """The suffix of the output a next pipeline stage takes as its input; None: no stage can follow."""
    cacheable: bool = False
    """Its outputs are kept in the stage cache: the same input bytes with the same params (and the
    same model and code) are answered from there (streams.cache_key). Only for operations whose
    outputs follow from those alone: not an LLM's answer, nor a diagnostic."""
    cache_excluded: frozenset[str] = frozenset()
    """Params left out of the cache key because they provably do not change the outputs."""


OPERATIONS: dict[str, OperationSpec] = {
    spec.name: spec
    for spec in (
        OperationSpec(
            name="noop",
            pool=Pool.CPU,
            params=NoopParams,
            description="Sleeps through `steps` progress updates; can fail on request.",
            timeout_s=2 * 3600.0,  # twice the longest `duration_s` it accepts
        ),
        OperationSpec(
            name="transcribe",
            cacheable=True,
            pool=Pool.GPU,
            params=TranscribeParams,
            description="Speech to text with faster-whisper: text inline, segments in .json, full text in .txt.",
            needs_file=True,
            # Ten minutes for the model's first load (a download, for hub models) plus four times
            # the audio's length: a large model on a CPU runs at about real time, tiny.en far faster.
            timeout_s=600.0,
            timeout_per_media_s=4.0,
            main_output=".json",
        ),
        OperationSpec(
            name="generate_srt",
            cacheable=True,
            pool=Pool.GPU,
            params=GenerateSrtParams,
            description="Speech to subtitles with faster-whisper: .srt and .vtt files.",
            needs_file=True,
            timeout_s=600.0,
            timeout_per_media_s=4.0,
            main_output=".srt",
        ),
        OperationSpec(
            name="detect_language",
            cacheable=True,
            pool=Pool.GPU,
            params=DetectLanguageParams,
            description="The language spoken in the first 30 s, and the model's confidence, by faster-whisper.",
            needs_file=True,
            timeout_s=600.0,  # the model's first load; only 30 s of audio are decoded, however long the file
        ),
        OperationSpec(
            name="convert",
            cacheable=True,
            pool=Pool.CPU,
            params=ConvertParams,
            description="To MP4 (H.264 + AAC) with PyAV, remuxing when the streams allow it; or M4A.",
            needs_file=True,
            # A remux takes seconds; x264 on a small CPU transcodes HD at about real time.
            timeout_s=600.0,
            timeout_per_media_s=4.0,
            main_output=".mp4",  # or .m4a (`audio_only`): audio or video either way
        ),
        OperationSpec(
            name="fix_srt",
            pool=Pool.LLM,
            params=FixSrtParams,
            description="An SRT's text corrected by an OpenAI-compatible chat model; timestamps kept.",
            needs_file=True,
            calls_llm=True,
            # An hour covers a feature film's subtitles at MAX_LLM_CONCURRENCY; a slow endpoint is
            # the likely cause of a timeout, and it may be faster on the next attempt.
            timeout_s=3600.0,
            timeout_transient=True,
            input_kinds=("srt",),
            main_output=".srt",
        ),
        OperationSpec(
            name="translate_srt",
            pool=Pool.LLM,
            params=TranslateSrtParams,
            description="An SRT or VTT file translated by an OpenAI-compatible chat model into each of"
            " `languages`: .srt and .vtt per language, timestamps kept.",
            needs_file=True,
            calls_llm=True,
            # fix_srt's hour per language, for a few languages; a job's `timeout_s` gives more.
            timeout_s=4 * 3600.0,
            timeout_transient=True,
            input_kinds=("srt", "vtt"),
            main_output=".srt",  # the first language's
        ),
    )
}


def operation(job_type: str) -> OperationSpec:
    """The spec of `job_type`; raises UnknownOperationError."""
    try:
        return OPERATIONS[job_type]
    except KeyError:
        raise UnknownOperationError(job_type, sorted(OPERATIONS)) from None


def validate_params(spec: OperationSpec, params: dict[str, Any] | None, llm: LlmEndpoints) -> dict[str, Any]:
    """Params checked against the spec, with defaults filled in, and an LLM operation's
    `base_url` against the endpoints the operator allows; raises InvalidParamsError."""
    try:
        parsed: msgspec.Struct = msgspec.convert(params or {}, spec.params)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(_located(exc)) from None
    result: dict[str, Any] = msgspec.to_builtins(parsed)
    check_llm_endpoint(spec, result, llm)
    return result


def check_llm_endpoint(spec: OperationSpec, params: dict[str, Any], llm: LlmEndpoints) -> None:
    """InvalidParamsError when an operation that calls the LLM names a `base_url` the operator
    neither configured nor listed (the worker would send its key there)."""
    url = params.get("base_url")
    if spec.calls_llm and isinstance(url, str) and llm.permitted(url) is None:
        raise InvalidParamsError(
            f"base_url {url!r} is not an LLM endpoint this server allows: name none (the configured"
            " JOBCAST_LLM_BASE_URL is used) or one the operator lists in JOBCAST_LLM_ALLOWED_BASE_URLS"
            " - at `$.params.base_url`"
        )


def parse_params(params: dict[str, Any], params_type: type[P]) -> P:
    """Typed params for a handler; raises InvalidParamsError."""
    try:
        return msgspec.convert(params, params_type)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(_located(exc)) from None


def _located(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with its path rooted at `params` (errors at the root name none)."""
    message = str(exc)
    if " - at `$" not in message:
        return f"{message} - at `$.params`"
    return message.replace(" - at `$", " - at `$.params", 1)
