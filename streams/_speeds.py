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
"""The params that change how fast a whisper operation runs (validated params carry them all). The
worker keys on the device and compute type it resolved (a CPU and a GPU worker of one pool learn
apart); a None left unresolved keys as `default`. An LLM operation keys on its model alone; convert
has none of them and keys on the operation."""
FAMILY_PARAMS = ("model",)
"""What the API knows of a pending whisper job's speed: its model, not the device of the worker that
will take it (`Speed.family` groups a model's keys over devices)."""
SPEED_ALPHA = 0.5
"""Weight of the newest job in the moving average: half the estimate is the last run, so a
changed machine shows within a few jobs while one odd run moves it only half-way."""
MAX_KEY_CHARS = 120
"""A key past this length (a model given as a long local path) is cut and suffixed by its hash."""


class Speed(msgspec.Struct, kw_only=True):
    """A key's value in the speeds bucket: the moving averages of its recent jobs."""

    seconds_per_unit: float
    """Wall-clock seconds per unit of a job's own pace, measured from its first progress past 0 %
    (the cost paid once before it, a model load or a download, is `start_s`)."""
    job_seconds: float
    """Wall-clock seconds of a whole job, for a queued job whose units are not known yet."""
    start_s: float = 0.0
    """Seconds of the newest job's run before its units' pace (download, model load, decoding)."""
    family: str = ""
    """`speed_family` of the key: the API's estimate for a job whose device it cannot know."""
    samples: int = 1
    """Jobs averaged so far."""
    updated_at: float = 0.0
    """Unix time of the last update."""


def is_unit_operation(operation: str) -> bool:
    """Whether the operation counts units of work, and so has a learned speed and an ETA."""
    return operation in MEDIA_UNIT_OPERATIONS or operation in CHUNK_UNIT_OPERATIONS


def speed_params(operation: str) -> tuple[str, ...]:
    """The params that key the operation's speed (see SPEED_PARAMS)."""
    if operation in CHUNK_UNIT_OPERATIONS:
        return ("model",)
    return () if operation == "convert" else SPEED_PARAMS


def speed_key(operation: str, params: Mapping[str, Any]) -> str:
    """The speeds bucket key of a job: its operation and the params in SPEED_PARAMS it has, in a
    form NATS accepts as a key (letters, digits, `-`, `_`, `=`, joined by dots)."""
    return _key(operation, params, speed_params(operation))


def speed_family(operation: str, params: Mapping[str, Any]) -> str:
    """The key with only the params the API knows of a pending job (FAMILY_PARAMS): the same for a
    model's speeds on every device."""
    return _key(operation, params, tuple(n for n in speed_params(operation) if n in FAMILY_PARAMS))


def _key(operation: str, params: Mapping[str, Any], names: tuple[str, ...]) -> str:
    parts = [operation, *(str(params.get(name) or "default") for name in names)]
    key = ".".join(re.sub(r"[^A-Za-z0-9_=-]", "-", part) or "-" for part in parts)
    if len(key) > MAX_KEY_CHARS:
        key = key[: MAX_KEY_CHARS - 17] + "." + hashlib.sha256(key.encode()).hexdigest()[:16]
    return key


def learned(
    previous: Speed | None, seconds: float, units: float, now: float, start_s: float = 0.0, family: str = ""
) -> Speed:
    """`previous` moved towards a job that took `seconds` for `units`, `start_s` of them before its
    units' pace (an exponential moving average with weight SPEED_ALPHA for the new job; the first
    job is taken as it is). The start cost is the newest job's alone: it is mostly paid once per
    worker (a model loaded on its first job), and averaging would carry half of that load into
    every later estimate."""
    start_s = min(max(0.0, start_s), seconds)
    per_unit = (seconds - start_s) / units
    if previous is None:
        return Speed(
            seconds_per_unit=per_unit, job_seconds=seconds, start_s=start_s, samples=1, updated_at=now,
            family=family,
        )  # fmt: skip
    return Speed(
        seconds_per_unit=SPEED_ALPHA * per_unit + (1 - SPEED_ALPHA) * previous.seconds_per_unit,
        job_seconds=SPEED_ALPHA * seconds + (1 - SPEED_ALPHA) * previous.job_seconds,
        start_s=start_s,
        samples=previous.samples + 1,
        updated_at=now,
        family=family,
    )
