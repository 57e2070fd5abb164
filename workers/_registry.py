"""Operation type -> handler. The pool of each type is in streams.OPERATIONS."""

from __future__ import annotations

from typing import Any

import av

from streams import MAX_INLINE_TEXT_BYTES, OPERATIONS
from workers._cache import Identity
from workers._context import Handler
from workers._settings import WorkerSettings
from workers.convert import convert
from workers.detect_language import detect_language
from workers.fix_srt import fix_srt
from workers.noop import noop
from workers.transcribe import generate_srt, transcribe
from workers.translate_srt import translate_srt
from workers.whisper import DEFAULT_MODEL, MODEL_CACHE, model_identity

HANDLERS: dict[str, Handler] = {
    "noop": noop,
    "transcribe": transcribe,
    "generate_srt": generate_srt,
    "detect_language": detect_language,
    "convert": convert,
    "fix_srt": fix_srt,
    "translate_srt": translate_srt,
}

_missing = set(OPERATIONS) - set(HANDLERS)
assert not _missing, f"operations without a handler: {_missing}"


def _whisper_identity(params: dict[str, Any], settings: WorkerSettings) -> dict[str, Any] | None:
    return model_identity(
        params.get("model", DEFAULT_MODEL), params.get("device"), params.get("compute_type")
    )


def _transcript_identity(params: dict[str, Any], settings: WorkerSettings) -> dict[str, Any] | None:
    """The model's, and the worker's cut of the inline text (workers.transcribe._inline_text)."""
    model = _whisper_identity(params, settings)
    inline = min(settings.inline_text_bytes, MAX_INLINE_TEXT_BYTES)
    return None if model is None else {**model, "inline_text_bytes": inline}


def _pyav_identity(params: dict[str, Any], settings: WorkerSettings) -> dict[str, Any]:
    libraries = {name: ".".join(map(str, numbers)) for name, numbers in av.library_versions.items()}
    return {"av": av.__version__, "libav": libraries}


CACHE_IDENTITY: dict[str, Identity] = {
    "transcribe": _transcript_identity,
    "generate_srt": _transcript_identity,
    "detect_language": _whisper_identity,
    "convert": _pyav_identity,
}
"""What decides a cacheable operation's outputs besides its input and params (streams.cache_key),
worker settings included: detect_language and convert read none."""

_unkeyed = {name for name, spec in OPERATIONS.items() if spec.cacheable} - set(CACHE_IDENTITY)
assert not _unkeyed, f"cacheable operations without a cache identity: {_unkeyed}"


def handlers_for_pool(pool: str) -> dict[str, Handler]:
    """The handlers whose operations run on `pool`."""
    return {name: h for name, h in HANDLERS.items() if OPERATIONS[name].pool == pool}


def models_loaded() -> int:
    """Models the handlers of this process hold loaded (the whisper cache; no other keeps any)."""
    return len(MODEL_CACHE)
