"""Bounds every process agrees on: the size of a result, attempts per job, run time per attempt.

A message stays small (docs/architecture.md, "Bounds"): a job's result travels inline in its
`completed` event and is stored in SQLite, so it has a bound far below NATS's 1 MB payload;
segments, words, full texts and media live in output files that the result links to.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_RESULT_BYTES = 65_536
"""A job's result, encoded as JSON, is at most this many bytes; a worker fails a job whose
handler returns more ("the result is N bytes, over the ... bound")."""
MAX_INLINE_TEXT_BYTES = 32_768
"""A transcript's `text` inline in a result is cut to this many bytes of JSON (half the result
bound, leaving room for the rest); the result then says `text_truncated: true` and links the .txt."""
MAX_ERROR_CHARS = 4_000
"""A failed or retrying job's error message is cut to this many characters."""

MAX_ATTEMPTS = 50
"""The highest `max_attempts` a job may ask for; the consumers' MaxDeliver is one more."""
MAX_DELIVER = MAX_ATTEMPTS + 1
"""JetStream deliveries per submission: one past MAX_ATTEMPTS, so a worker still gets the message
once a job's last attempt killed its worker, and records that the job gave up."""

MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""The longest run-time limit a job may set (`timeout_s`), one week."""
MIN_TIMEOUT_S = 1.0
"""The shortest one."""

_encoder = msgspec.json.Encoder()


def result_size(result: dict[str, Any] | None) -> int:
    """Bytes of `result` as JSON, as it travels in its event and sits in SQLite."""
    return len(_encoder.encode(result))


def clip_text(text: str, max_bytes: int = MAX_INLINE_TEXT_BYTES) -> tuple[str, bool]:
    """`text` cut to at most `max_bytes` of JSON (quotes and escapes counted), and whether it was cut."""
    if len(_encoder.encode(text)) <= max_bytes:
        return text, False
    low, high = 0, min(len(text), max_bytes)  # the longest prefix that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if len(_encoder.encode(text[:middle])) <= max_bytes:
            low = middle
        else:
            high = middle - 1
    return text[:low], True


def clip_error(error: str) -> str:
    """An error message cut to MAX_ERROR_CHARS, saying so."""
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[: MAX_ERROR_CHARS - 40]}... ({len(error)} characters, cut)"
