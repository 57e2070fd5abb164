"""The quality gate's model repair: flagged ranges transcribed again, and the better of two kept.

Pure: the re-run is a function the caller passes in (`workers.whisper.transcribe_ranges` in a
worker thread), so the choice is tested on synthetic segment lists. See docs/subtitles.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import msgspec

from workers._quality_checks import (
    LOOP,
    Finding,
    Flag,
    Limits,
    Span,
    cut,
    segment_findings,
    segment_flags,
    segment_timing_flags,
    unflagged_words,
    words,
)

MAX_RERUN_RANGES = 20
"""Ranges re-transcribed per job at most: each costs a 30 s decoding window, however short."""
JOIN_GAP_S = 2.0
"""Flagged neighbours closer than this are one re-run range; farther apart, each gets its own, so a
filler at 60 s and a loop at 600 s do not become one 9-minute re-run."""

S = TypeVar("S", bound=Span)
Rerun = Callable[[list[tuple[float, float]]], list[list[S]]]
"""Transcribes each (start, end) range again with safer decoding; segments in absolute times.
Raises `RerunError` where it could not (the first transcription then stays)."""


class RerunError(Exception):
    """The re-run could not be done (audio unreadable, model unavailable): the reason, for the report."""


class Repair(msgspec.Struct, kw_only=True):
    """What re-transcribing the flagged ranges found and did."""

    found: list[Flag]
    fixed: list[Flag]
    ranges: int = 0
    """Ranges re-transcribed."""
    kept: int = 0
    """Of those, ranges where the re-run was better and replaced the first transcription."""
    skipped: int = 0
    """Flagged ranges left alone: past `MAX_RERUN_RANGES`, or all of them when the re-run failed."""
    skipped_why: str | None = None
    """Why the re-run failed, when it did (cut like a flag's text)."""


class _Range(msgspec.Struct):
    """A run of flagged segments (indexes `first`..`last`) and what the checks found in it."""

    first: int
    last: int
    loops: bool
    weight: int


def _ranges(segments: Sequence[Span], findings: list[Finding]) -> list[_Range]:
    """The flagged segment index ranges: overlapping ones joined, and neighbours closer than
    `JOIN_GAP_S`."""
    joined: list[_Range] = []
    for f in sorted(findings, key=lambda f: (f.first, f.last)):
        if joined and (
            f.first <= joined[-1].last
            or (
                f.first == joined[-1].last + 1
                and segments[f.first].start - segments[f.first - 1].end <= JOIN_GAP_S
            )
        ):
            last = joined[-1]
            last.last, last.loops, last.weight = (
                max(last.last, f.last),
                last.loops or f.flag.check == LOOP,
                last.weight + f.weight,
            )
        else:
            joined.append(_Range(f.first, f.last, f.flag.check == LOOP, f.weight))
    return joined


def severity(segments: Sequence[Span], limits: Limits) -> int:
    """How wrong segments are: the words wrong in their segment flags plus one per timing flag."""
    return sum(f.weight for f in segment_findings(segments)) + len(segment_timing_flags(segments, limits))


def _better(before: Sequence[Span], again: Sequence[Span], limits: Limits) -> bool:
    """Whether the re-run is less wrong and keeps at least half of the words the checks did not
    flag (so an empty re-run wins only where the range was all loop, filler or empty)."""
    clean = Counter(unflagged_words(before))
    kept = clean & Counter(word for s in again for word in words(s.text))
    return severity(again, limits) < severity(before, limits) and 2 * kept.total() >= clean.total()


def _gone(flag: Flag, again: Sequence[Span]) -> bool:
    """Whether a flag's problem is gone from the re-run: no flag of its check over its time."""
    return not any(
        f.check == flag.check and f.start < flag.end and flag.start < f.end for f in segment_flags(again)
    )


def repair_segments(
    segments: list[S], rerun: Rerun[S], limits: Limits | None = None
) -> tuple[list[S], Repair]:
    """Transcribe each range of loops, empty and filler-only segments again with `rerun` (the ranges
    with loops first when there are too many); keep the re-run where it is better (`_better`)."""
    limits = limits or Limits()
    findings = segment_findings(segments)
    ranges = _ranges(segments, findings)
    by_need = sorted(ranges, key=lambda r: (not r.loops, -r.weight))
    chosen = sorted(by_need[:MAX_RERUN_RANGES], key=lambda r: r.first)
    skipped = len(ranges) - len(chosen)
    repair = Repair(found=[f.flag for f in findings], fixed=[], ranges=len(chosen), skipped=skipped)
    if not chosen:
        return segments, repair
    try:
        reruns = rerun([(segments[r.first].start, segments[r.last].end) for r in chosen])
    except RerunError as exc:
        return segments, msgspec.structs.replace(
            repair, ranges=0, skipped=len(ranges), skipped_why=cut(str(exc))
        )
    kept: list[S] = []
    position = 0
    for r, again in zip(chosen, reruns, strict=True):
        before = segments[r.first : r.last + 1]
        kept.extend(segments[position : r.first])
        position = r.last + 1
        if not _better(before, again, limits):
            kept.extend(before)  # not better: the first transcription stays
            continue
        repair.kept += 1
        how = "re-transcribed with safer decoding" if again else "removed: the safer re-run heard no speech"
        repair.fixed.extend(
            msgspec.structs.replace(f.flag, how=how)
            for f in findings
            if r.first <= f.first and f.last <= r.last and _gone(f.flag, again)
        )
        kept.extend(again)
    kept.extend(segments[position:])
    return kept, repair
