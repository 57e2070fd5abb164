"""Operation type -> handler. The pool of each type is in streams.OPERATIONS."""

from __future__ import annotations

from streams import OPERATIONS
from workers._context import Handler
from workers.convert import convert
from workers.detect_language import detect_language
from workers.fix_srt import fix_srt
from workers.noop import noop
from workers.transcribe import generate_srt, transcribe
from workers.translate_srt import translate_srt
from workers.whisper import MODEL_CACHE

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


def handlers_for_pool(pool: str) -> dict[str, Handler]:
    """The handlers whose operations run on `pool`."""
    return {name: h for name, h in HANDLERS.items() if OPERATIONS[name].pool == pool}


def models_loaded() -> int:
    """Models the handlers of this process hold loaded (the whisper cache; no other keeps any)."""
    return len(MODEL_CACHE)
