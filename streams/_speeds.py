"""Learned speeds: how many seconds of work one unit of an operation takes, per operation, model,
device and compute type, and the moving average that learns them from completed jobs.

A unit is a second of media for the whisper and media operations, a chunk of cues for the LLM
ones. Workers write a key's `Speed` when a job completes (SPEEDS_BUCKET); the API reads them to
estimate when a pending job starts. Pure: no I/O here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import msgspec

MEDIA_UNIT_OPERATIONS = frozenset({"transcribe", "generate_srt", "detect_language", "convert"})
"""Operations whose unit is a second of the input media (`JobContext.media_duration`)."""
CHUNK_UNIT_OPERATIONS = frozenset({"fix_srt", "translate_srt"})
"""Operations whose unit is a chunk of cues sent to the LLM (`JobContext.work_units`)."""
SPEED_PARAMS = ("model", "device", "compute_type")
"""The params that change how fast a whisper operation runs (validated params carry them all; None
keys as `default`, the worker's own choice). An LLM operation keys on its model alone; convert has
none of them and keys on the operation."""
SPEED_ALPHA = 0.5
"""Weight of the newest job in the moving average: half the estimate is the last run, so a
changed machine shows within a few jobs while one odd run moves it only half-way."""
MAX_KEY_CHARS = 120
"""A key past this length (a model given as a long local path) is cut and suffixed by its hash."""


class Speed(msgspec.Struct, kw_only=True):
    """A key's value in the speeds bucket: the moving averages of its recent jobs."""

    seconds_per_unit: float
    """Wall-clock seconds of a job's run (download, model load and work) per unit."""
    job_seconds: float
    """Wall-clock seconds of a whole job, for a queued job whose units are not known yet."""
    samples: int = 1
    """Jobs averaged so far."""
    updated_at: float = 0.0
    """Unix time of the last update."""


def speed_key(operation: str, params: Mapping[str, Any]) -> str:
    """The speeds bucket key of a job: its operation and the params in SPEED_PARAMS it has, in a
    form NATS accepts as a key (letters, digits, `-`, `_`, `=`, joined by dots)."""
    names = (
        () if operation == "convert" else ("model",) if operation in CHUNK_UNIT_OPERATIONS else SPEED_PARAMS
    )
    parts = [operation, *(str(params.get(name) or "default") for name in names)]
    key = ".".join(re.sub(r"[^A-Za-z0-9_=-]", "-", part) or "-" for part in parts)
    if len(key) > MAX_KEY_CHARS:
        key = key[: MAX_KEY_CHARS - 17] + "." + hashlib.sha256(key.encode()).hexdigest()[:16]
    return key


def learned(previous: Speed | None, seconds: float, units: float, now: float) -> Speed:
    """`previous` moved towards a job that took `seconds` for `units` (an exponential moving
    average with weight SPEED_ALPHA for the new job; the first job is taken as it is)."""
    per_unit = seconds / units
    if previous is None:
        return Speed(seconds_per_unit=per_unit, job_seconds=seconds, samples=1, updated_at=now)
    return Speed(
        seconds_per_unit=SPEED_ALPHA * per_unit + (1 - SPEED_ALPHA) * previous.seconds_per_unit,
        job_seconds=SPEED_ALPHA * seconds + (1 - SPEED_ALPHA) * previous.job_seconds,
        samples=previous.samples + 1,
        updated_at=now,
    )
