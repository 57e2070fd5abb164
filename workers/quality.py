"""The subtitle quality gate: checks on transcript segments and cues, and the repairs they lead to.

Everything here is pure: the model re-run of a flagged range is a function the caller passes in
(`workers.whisper.transcribe_ranges` in a worker thread), so the checks, the better-of-two choice
and the timing fixes are tested on synthetic segment lists. The checks live in
`workers._quality_checks`, the model repair in `workers._quality_repair`. See docs/subtitles.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from workers import subtitles
from workers._quality_checks import (
    EMPTY,
    EPSILON,
    FILLER,
    LOOP,
    MAX_CPS,
    MAX_DURATION,
    MAX_FLAG_TEXT,
    MIN_DURATION,
    SEGMENT_CHECKS,
    SUBTITLE_CHECKS,
    TRANSCRIPT_CHECKS,
    Flag,
    Limits,
    Span,
    cue_flags,
    cue_text,
    is_filler,
    segment_flags,
    segment_timing_flags,
    timing_flags,
)
from workers._quality_repair import MAX_RERUN_RANGES, Repair, RerunError, repair_segments
from workers.subtitles import Cue

__all__ = [
    "EMPTY",
    "FILLER",
    "LOOP",
    "MAX_CPS",
    "MAX_DURATION",
    "MAX_FLAG_TEXT",
    "MAX_LISTED_FLAGS",
    "MAX_RERUN_RANGES",
    "MIN_DURATION",
    "OFF",
    "SEGMENT_CHECKS",
    "SUBTITLE_CHECKS",
    "TRANSCRIPT_CHECKS",
    "Flag",
    "Limits",
    "Repair",
    "RerunError",
    "Span",
    "build_cues",
    "cue_flags",
    "fix_timing",
    "is_filler",
    "repair_segments",
    "report",
    "segment_flags",
    "subtitle_gate",
    "timing_flags",
    "transcript_gate",
]

MAX_LISTED_FLAGS = 20
"""Flags listed per list of the `quality` section (the counts are whole): a result stays small."""


class _Piece(msgspec.Struct):
    """A cue being fixed: its times and its text on one line."""

    start: float
    end: float
    text: str


def build_cues(segments: Sequence[subtitles.Segment], limits: Limits) -> list[Cue]:
    """`subtitles.build_cues` with the layout of `limits`."""
    return subtitles.build_cues(
        segments,
        max_line_length=limits.max_line_length,
        max_lines_per_cue=limits.max_lines_per_cue,
        max_cue_duration=limits.max_cue_duration,
    )


def _fits(piece: _Piece, limits: Limits) -> bool:
    """Whether a piece passes every timing check and wraps into the allowed lines."""
    if timing_flags(piece.start, piece.end, piece.text, limits, SUBTITLE_CHECKS):
        return False
    return len(subtitles.wrap_text(piece.text, limits.max_line_length)) <= limits.max_lines_per_cue


def _split(piece: _Piece, limits: Limits) -> tuple[list[_Piece], str]:
    """A too-long piece split at words (timed by character count), or cut to the longest time
    when it is one word; with how it was fixed."""
    cues = build_cues([subtitles.Segment(start=piece.start, end=piece.end, text=piece.text)], limits)
    if len(cues) > 1:
        return [_Piece(c.start, c.end, " ".join(c.lines)) for c in cues], f"split into {len(cues)} cues"
    shortened = _Piece(piece.start, round(piece.start + limits.max_cue_duration, 3), piece.text)
    return [shortened], f"shortened to {limits.max_cue_duration:g} s (one word cannot be split)"


def _ms_up(seconds: float) -> float:
    """`seconds` rounded up to the millisecond (a float a hair over a whole millisecond stays on it)."""
    return math.ceil(seconds * 1000 - EPSILON * 1000) / 1000


def _ms_down(seconds: float) -> float:
    """`seconds` rounded down to the millisecond."""
    return math.floor(seconds * 1000 + EPSILON * 1000) / 1000


def _extended(piece: _Piece, earliest: float, latest: float | None, limits: Limits) -> _Piece:
    """The piece shown long enough to read, as far as the gaps before and after it allow. Its times
    are whole milliseconds (as a player gets them) rounded outwards, so the length met is not lost to
    rounding: an end rounded to the nearest millisecond leaves a cue a hair above `max_cps`."""
    needed = min(max(limits.min_cue_duration, len(piece.text) / limits.max_cps), limits.max_cue_duration)
    end = _ms_up(piece.start + needed)
    if end - piece.start > limits.max_cue_duration + EPSILON:  # rounding up must not break the maximum
        end = _ms_down(piece.start + limits.max_cue_duration)
    if latest is not None:
        end = max(piece.end, min(end, latest))
    start = piece.start
    if end - start < needed - EPSILON:  # the gap after is too short: begin earlier, into the gap before
        start = min(piece.start, max(earliest, _ms_down(end - needed)))
    return _Piece(round(start, 3), round(end, 3), piece.text)


def fix_timing(
    cues: Sequence[Cue], limits: Limits, media_end: float | None = None
) -> tuple[list[Cue], list[Flag]]:
    """Fix what needs no model: drop empty cues, split too-long ones, show a too-fast or too-short cue
    longer, into the gaps around it (up to `media_end` after the last), or where the gaps are too
    short merge it with a neighbour if the result passes every limit. Returns the cues, numbered
    1..n, and the flags fixed."""
    fixed: list[Flag] = []
    pieces: list[_Piece] = []
    for cue in cues:
        piece = _Piece(cue.start, cue.end, cue_text(cue))
        if not piece.text:
            fixed.extend(msgspec.structs.replace(f, how="dropped") for f in cue_flags([cue], limits))
            continue
        long = timing_flags(piece.start, piece.end, piece.text, limits, (MAX_DURATION,))
        if long:
            split, how = _split(piece, limits)
            fixed.extend(msgspec.structs.replace(f, how=how) for f in long)
            pieces.extend(split)
        else:
            pieces.append(piece)

    def flags(piece: _Piece) -> list[Flag]:
        return timing_flags(piece.start, piece.end, piece.text, limits, (MAX_CPS, MIN_DURATION))

    i = 0
    while i < len(pieces):
        piece = pieces[i]
        problems = flags(piece)
        if not problems:
            i += 1
            continue
        previous, following = (pieces[i - 1] if i else None), (pieces[i + 1] if i + 1 < len(pieces) else None)
        earliest = previous.end if previous is not None else 0.0
        latest = following.start if following is not None else media_end
        # Showing it longer keeps the text where it is spoken; a merge only when the gaps are too short.
        extended = _extended(piece, earliest, latest, limits)
        if not flags(extended):
            how = f"shown longer: {extended.start:.3f}-{extended.end:.3f} s, into the gaps around it"
            fixed.extend(msgspec.structs.replace(f, how=how) for f in problems)
            pieces[i] = extended
            i += 1
            continue
        if following is not None:
            merged = _Piece(piece.start, following.end, f"{piece.text} {following.text}")
            if _fits(merged, limits):
                how = "merged with the next cue"
                fixed.extend(msgspec.structs.replace(f, how=how) for f in [*problems, *flags(following)])
                pieces[i : i + 2] = [merged]
                continue
        if previous is not None:
            merged = _Piece(previous.start, piece.end, f"{previous.text} {piece.text}")
            if _fits(merged, limits):
                fixed.extend(msgspec.structs.replace(f, how="merged with the previous cue") for f in problems)
                pieces[i - 1 : i + 1] = [merged]
                continue
        pieces[i] = extended  # as readable as the gaps allow, and still flagged
        i += 1
    out = [
        Cue(n, p.start, p.end, subtitles.wrap_text(p.text, limits.max_line_length))
        for n, p in enumerate(pieces, 1)
    ]
    return out, fixed


def _listed(flags: Sequence[Flag]) -> dict[str, Any]:
    """A bounded list of flags with the whole count."""
    return {"count": len(flags), "flags": [msgspec.to_builtins(f) for f in flags[:MAX_LISTED_FLAGS]]}


def report(
    checks: Sequence[str],
    limits: dict[str, Any],
    repair: Repair,
    found: Sequence[Flag],
    fixed: Sequence[Flag],
    left: Sequence[Flag],
) -> dict[str, Any]:
    """The result's `quality` section: checks run, the limits they applied, flags found, fixed (how)
    and left, and what the model re-run did (`skipped_why`: why it failed, when it did)."""
    return {
        "enabled": True,
        "checks": list(checks),
        "limits": limits,
        "found": _listed(sorted(found, key=lambda f: f.start)),
        "fixed": _listed(sorted(fixed, key=lambda f: f.start)),
        "left": _listed(sorted(left, key=lambda f: f.start)),
        "retranscribed": {
            "ranges": repair.ranges,
            "kept": repair.kept,
            "skipped": repair.skipped,
            "skipped_why": repair.skipped_why,
        },
    }


def subtitle_gate(
    segments: Sequence[subtitles.Segment], repair: Repair, limits: Limits, media_end: float | None = None
) -> tuple[list[Cue], dict[str, Any]]:
    """Cues from repaired segments, their timing fixed, and the `quality` section: loops are checked
    on the segments (they run across cues), everything else on the cues a player shows."""
    cues = build_cues(segments, limits)
    timing = [f for f in cue_flags(cues, limits) if f.check not in SEGMENT_CHECKS]
    fixed_cues, timing_fixed = fix_timing(cues, limits, media_end)
    remaining = segment_flags(segments)
    # An empty segment the re-run could not fill makes no cue: nothing is left on screen.
    dropped = [
        msgspec.structs.replace(f, how="dropped: an empty segment makes no cue")
        for f in remaining
        if f.check == EMPTY
    ]
    left = [f for f in remaining if f.check == LOOP] + cue_flags(fixed_cues, limits)
    fixed = [*repair.fixed, *timing_fixed, *dropped]
    found = [*repair.found, *timing]
    return fixed_cues, report(SUBTITLE_CHECKS, msgspec.to_builtins(limits), repair, found, fixed, left)


def transcript_gate(
    original: Sequence[Span], repaired: Sequence[Span], repair: Repair, limits: Limits
) -> dict[str, Any]:
    """The `quality` section of a transcript: its timing flags are reported, not fixed, and only the
    limits a transcript is checked against are listed."""
    found = [*repair.found, *segment_timing_flags(original, limits)]
    left = [*segment_flags(repaired), *segment_timing_flags(repaired, limits)]
    applied = {"max_cps": limits.max_cps, "min_cue_duration": limits.min_cue_duration}
    return report(TRANSCRIPT_CHECKS, applied, repair, found, repair.fixed, left)


OFF = {"enabled": False}
"""The `quality` section of a job run with `quality_gate: false`: no checks ran."""
