"""The subtitle quality gate: checks on transcript segments and cues, and the repairs they lead to.

Everything here is pure: the model re-run of a flagged range is a function the caller passes in
(`workers.whisper.transcribe_ranges` in a worker thread), so the checks, the better-of-two choice
and the timing fixes are tested on synthetic segment lists. See docs/subtitles.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from workers import subtitles
from workers.subtitles import Cue

LOOP = "loop"
MAX_CPS = "max_cps"
MIN_DURATION = "min_duration"
MAX_DURATION = "max_duration"
EMPTY = "empty"
FILLER = "filler"
SEGMENT_CHECKS = (LOOP, EMPTY, FILLER)
"""The checks a model re-run can fix: they are about what was heard, not how it is timed."""
SUBTITLE_CHECKS = (*SEGMENT_CHECKS, MAX_CPS, MIN_DURATION, MAX_DURATION)
TRANSCRIPT_CHECKS = (*SEGMENT_CHECKS, MAX_CPS, MIN_DURATION)
"""`transcribe` has no cue length limit; its timing flags are reported, since a transcript keeps
the model's times."""

MAX_LOOP_WORDS = 8
"""The longest phrase looked for as a loop; Whisper's loops are a word or a short sentence."""
LOOP_REPEATS = 3
SINGLE_WORD_REPEATS = 4
"""One word thrice is speech ("no, no, no"); Whisper's one-word loops run to dozens."""
FILLER_WORDS = frozenset(
    {"um", "umm", "uh", "uhm", "uh-huh", "hmm", "hm", "mm", "mmm", "mhm", "ah", "er", "erm", "eh"}
)
MAX_LISTED_FLAGS = 20
"""Flags listed per list of the `quality` section (the counts are whole): a result stays small."""
MAX_FLAG_TEXT = 80
MAX_RERUN_RANGES = 20
"""Ranges re-transcribed per job at most: each costs a 30 s decoding window, however short."""
_EPSILON = 1e-6  # cue times are milliseconds; a limit met to the millisecond is met

_APOSTROPHES = "'\u2019-"  # inside a word ("don't", "uh-huh"), not around it
_WORD = re.compile(rf"[\w{_APOSTROPHES}]+")


class Span(Protocol):
    """A timed piece of text: a transcript segment."""

    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def text(self) -> str: ...


S = TypeVar("S", bound=Span)
Rerun = Callable[[list[tuple[float, float]]], list[list[S]]]
"""Transcribes each (start, end) range again with safer decoding; segments in absolute times."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What a cue may be: reading speed, time on screen, and the layout it is wrapped to."""

    max_cps: float = 20.0
    min_cue_duration: float = 0.7
    max_cue_duration: float = 7.0
    max_line_length: int = 42
    max_lines_per_cue: int = 2


class Flag(msgspec.Struct, frozen=True, kw_only=True):
    """One finding: which check, where (seconds), the text, why; `how` once it is fixed."""

    check: str
    start: float
    end: float
    text: str
    why: str
    how: str | None = None


def _words(text: str) -> list[str]:
    """The words of `text`, lowercased, without punctuation."""
    return [w.strip(_APOSTROPHES) for w in _WORD.findall(text.lower()) if w.strip(_APOSTROPHES)]


def is_filler(text: str) -> bool:
    """Whether non-empty `text` holds only filler words ("um", "uh") or punctuation ("...", "♪")."""
    return bool(text.strip()) and all(word in FILLER_WORDS for word in _words(text))


def _flag(check: str, start: float, end: float, text: str, why: str) -> Flag:
    """A flag with its times to the millisecond and its text cut to a bound."""
    cut = text if len(text) <= MAX_FLAG_TEXT else text[: MAX_FLAG_TEXT - 1] + "…"
    return Flag(check=check, start=round(start, 3), end=round(end, 3), text=cut, why=why)


def _loops(segments: Sequence[Span]) -> list[tuple[int, int, str]]:
    """(first, last segment index, why) of each phrase repeated in a row, within or across segments."""
    words = [(word, i) for i, segment in enumerate(segments) for word in _words(segment.text)]
    tokens = [word for word, _ in words]
    found: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        best_n, best_k = 0, 0
        for n in range(1, min(MAX_LOOP_WORDS, len(tokens) - i) + 1):
            phrase = tokens[i : i + n]
            k = 1
            while tokens[i + k * n : i + (k + 1) * n] == phrase:
                k += 1
            if k >= (SINGLE_WORD_REPEATS if n == 1 else LOOP_REPEATS) and k * n > best_k * best_n:
                best_n, best_k = n, k
        if not best_n:
            i += 1
            continue
        repeated = " ".join(tokens[i : i + best_n])
        why = f"{repeated!r} {best_k} times in a row"
        found.append((words[i][1], words[i + best_k * best_n - 1][1], why))
        i += best_k * best_n
    return found


def _segment_findings(segments: Sequence[Span]) -> list[tuple[int, int, Flag]]:
    """Each segment flag with the indexes of the first and last segment it covers."""
    findings: list[tuple[int, int, Flag]] = []
    for first, last, why in _loops(segments):
        text = " ".join(s.text for s in segments[first : last + 1])
        findings.append((first, last, _flag(LOOP, segments[first].start, segments[last].end, text, why)))
    for i, segment in enumerate(segments):
        if not segment.text.strip():
            findings.append((i, i, _flag(EMPTY, segment.start, segment.end, "", "no text")))
        elif is_filler(segment.text):
            why = "only filler words or punctuation"
            findings.append((i, i, _flag(FILLER, segment.start, segment.end, segment.text, why)))
    return sorted(findings, key=lambda f: (f[2].start, f[2].end, f[2].check))


def segment_flags(segments: Sequence[Span]) -> list[Flag]:
    """Loops, empty segments and filler-only segments, in time order."""
    return [flag for _, _, flag in _segment_findings(segments)]


def timing_flags(start: float, end: float, text: str, limits: Limits, checks: Sequence[str]) -> list[Flag]:
    """The timing checks among `checks` on one cue or segment: reading speed and time on screen."""
    duration = end - start
    flags: list[Flag] = []
    cps = len(text) / duration if duration > 0 else float("inf")
    if MAX_CPS in checks and text and cps > limits.max_cps + _EPSILON:
        why = f"{cps:.1f} characters per second, above {limits.max_cps:g}"
        flags.append(_flag(MAX_CPS, start, end, text, why))
    if MIN_DURATION in checks and duration < limits.min_cue_duration - _EPSILON:
        why = f"{duration:.3f} s on screen, under {limits.min_cue_duration:g} s"
        flags.append(_flag(MIN_DURATION, start, end, text, why))
    if MAX_DURATION in checks and duration > limits.max_cue_duration + _EPSILON:
        why = f"{duration:.3f} s on screen, over {limits.max_cue_duration:g} s"
        flags.append(_flag(MAX_DURATION, start, end, text, why))
    return flags


def cue_flags(cues: Sequence[Cue], limits: Limits) -> list[Flag]:
    """Every subtitle check but loops (those run on segments) on each cue, in time order."""
    flags: list[Flag] = []
    for cue in cues:
        text = " ".join(line.strip() for line in cue.lines if line.strip())
        if not text:
            flags.append(_flag(EMPTY, cue.start, cue.end, "", "no text"))
            continue
        if is_filler(text):
            flags.append(_flag(FILLER, cue.start, cue.end, text, "only filler words or punctuation"))
        flags.extend(timing_flags(cue.start, cue.end, text, limits, SUBTITLE_CHECKS))
    return flags


class Repair(msgspec.Struct, kw_only=True):
    """What re-transcribing the flagged ranges found and did."""

    found: list[Flag]
    fixed: list[Flag]
    ranges: int = 0
    """Ranges re-transcribed."""
    kept: int = 0
    """Of those, ranges where the re-run was better and replaced the first transcription."""
    skipped: int = 0
    """Flagged ranges left alone past `MAX_RERUN_RANGES`."""


def _ranges(findings: list[tuple[int, int, Flag]]) -> list[tuple[int, int]]:
    """The flagged segment index ranges, overlapping and adjacent ones joined."""
    joined: list[tuple[int, int]] = []
    for first, last in sorted((f, la) for f, la, _ in findings):
        if joined and first <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], last))
        else:
            joined.append((first, last))
    return joined


def repair_segments(segments: list[S], rerun: Rerun[S]) -> tuple[list[S], Repair]:
    """Transcribe each range of loops, empty and filler-only segments again with `rerun`; keep the
    re-run where the same checks flag less in it than in the first transcription of that range."""
    findings = _segment_findings(segments)
    ranges = _ranges(findings)
    chosen, skipped = ranges[:MAX_RERUN_RANGES], len(ranges[MAX_RERUN_RANGES:])
    repair = Repair(found=[f for _, _, f in findings], fixed=[], ranges=len(chosen), skipped=skipped)
    if not chosen:
        return segments, repair
    reruns = rerun([(segments[first].start, segments[last].end) for first, last in chosen])
    kept: list[S] = []
    position = 0
    for (first, last), again in zip(chosen, reruns, strict=True):
        before = segments[first : last + 1]
        kept.extend(segments[position:first])
        position = last + 1
        if len(segment_flags(again)) >= len(segment_flags(before)):
            kept.extend(before)  # not better: the first transcription stays
            continue
        repair.kept += 1
        how = "re-transcribed with safer decoding" if again else "removed: the safer re-run heard no speech"
        fixed = [msgspec.structs.replace(f, how=how) for a, b, f in findings if first <= a and b <= last]
        repair.fixed.extend(fixed)
        kept.extend(again)
    kept.extend(segments[position:])
    return kept, repair


class _Piece(msgspec.Struct):
    """A cue being fixed: its times and its text on one line."""

    start: float
    end: float
    text: str


def build_cues(segments: Sequence[subtitles.Segment], limits: Limits) -> list[Cue]:
    """`subtitles.build_cues` with the layout of `limits`."""
    return subtitles.build_cues(
        segments, max_line_length=limits.max_line_length, max_lines_per_cue=limits.max_lines_per_cue,
        max_cue_duration=limits.max_cue_duration,
    )  # fmt: skip


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


def _extended(piece: _Piece, earliest: float, latest: float | None, limits: Limits) -> _Piece:
    """The piece shown long enough to read, as far as the gaps before and after it allow."""
    needed = min(max(limits.min_cue_duration, len(piece.text) / limits.max_cps), limits.max_cue_duration)
    end = piece.start + needed
    if latest is not None:
        end = max(piece.end, min(end, latest))
    start = piece.start
    if end - start < needed:  # the gap after is too short: begin earlier, into the gap before
        start = min(piece.start, max(earliest, end - needed))
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
        piece = _Piece(cue.start, cue.end, " ".join(line.strip() for line in cue.lines if line.strip()))
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
    checks: Sequence[str], limits: Limits, repair: Repair, found: Sequence[Flag],
    fixed: Sequence[Flag], left: Sequence[Flag],
) -> dict[str, Any]:  # fmt: skip
    """The result's `quality` section: checks run, limits, flags found, fixed (how) and left."""
    return {
        "enabled": True,
        "checks": list(checks),
        "limits": msgspec.to_builtins(limits),
        "found": _listed(sorted(found, key=lambda f: f.start)),
        "fixed": _listed(sorted(fixed, key=lambda f: f.start)),
        "left": _listed(sorted(left, key=lambda f: f.start)),
        "retranscribed": {"ranges": repair.ranges, "kept": repair.kept, "skipped": repair.skipped},
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
    dropped = [msgspec.structs.replace(f, how="dropped: an empty segment makes no cue") for f in remaining
               if f.check == EMPTY]  # fmt: skip
    left = [f for f in remaining if f.check == LOOP] + cue_flags(fixed_cues, limits)
    fixed = [*repair.fixed, *timing_fixed, *dropped]
    return fixed_cues, report(SUBTITLE_CHECKS, limits, repair, [*repair.found, *timing], fixed, left)


def transcript_gate(
    original: Sequence[Span], repaired: Sequence[Span], repair: Repair, limits: Limits
) -> dict[str, Any]:
    """The `quality` section of a transcript: its timing flags are reported, not fixed."""

    def timing(segments: Sequence[Span]) -> list[Flag]:
        return [
            f
            for s in segments
            if s.text.strip()
            for f in timing_flags(s.start, s.end, s.text, limits, TRANSCRIPT_CHECKS)
        ]

    found = [*repair.found, *timing(original)]
    left = [*segment_flags(repaired), *timing(repaired)]
    return report(TRANSCRIPT_CHECKS, limits, repair, found, repair.fixed, left)


OFF = {"enabled": False}
"""The `quality` section of a job run with `quality_gate: false`: no checks ran."""
