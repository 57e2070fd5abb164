"""The quality gate's checks on transcript segments and cues: what they flag, and how much."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import msgspec

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
FILLER_WHY = "only filler words or punctuation"
MAX_FLAG_TEXT = 80
"""Characters of a flag's `text` and `why` at most: a result stays small."""
EPSILON = 1e-6  # cue times are milliseconds; a limit met to the millisecond is met

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


class Finding(msgspec.Struct, frozen=True):
    """A segment flag with the first and last segment it covers and its weight: the words wrong in it
    (a loop's repeats past the first, a filler's words; an empty segment counts one)."""

    first: int
    last: int
    flag: Flag
    weight: int


def words(text: str) -> list[str]:
    """The words of `text`, lowercased, without punctuation."""
    return [w.strip(_APOSTROPHES) for w in _WORD.findall(text.lower()) if w.strip(_APOSTROPHES)]


def is_filler(text: str) -> bool:
    """Whether non-empty `text` holds only filler words ("um", "uh") or punctuation ("...", "♪")."""
    return bool(text.strip()) and all(word in FILLER_WORDS for word in words(text))


def cut(text: str) -> str:
    """`text` cut to `MAX_FLAG_TEXT` characters, an ellipsis saying so."""
    return text if len(text) <= MAX_FLAG_TEXT else text[: MAX_FLAG_TEXT - 1] + "…"


def cue_text(cue: Cue) -> str:
    """A cue's lines on one line."""
    return " ".join(line.strip() for line in cue.lines if line.strip())


def _flag(check: str, start: float, end: float, text: str, why: str) -> Flag:
    """A flag with its times to the millisecond and its text and reason cut to a bound."""
    return Flag(check=check, start=round(start, 3), end=round(end, 3), text=cut(text), why=cut(why))


class _Loop(msgspec.Struct, frozen=True):
    """A phrase of `size` words repeated `times` in a row, from word `at` of the segments' words."""

    at: int
    size: int
    times: int


def _loops(tokens: list[str]) -> list[_Loop]:
    """Each phrase repeated in a row among `tokens`, the longest run first where runs overlap."""
    found: list[_Loop] = []
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
        found.append(_Loop(i, best_n, best_k))
        i += best_k * best_n
    return found


def _indexed_words(segments: Sequence[Span]) -> list[tuple[str, int]]:
    """Each word of the segments with the index of its segment."""
    return [(word, i) for i, segment in enumerate(segments) for word in words(segment.text)]


def segment_findings(segments: Sequence[Span]) -> list[Finding]:
    """Loops (within or across segments), empty and filler-only segments, in time order."""
    indexed = _indexed_words(segments)
    findings: list[Finding] = []
    for loop in _loops([word for word, _ in indexed]):
        first, last = indexed[loop.at][1], indexed[loop.at + loop.size * loop.times - 1][1]
        why = (
            f"{' '.join(w for w, _ in indexed[loop.at : loop.at + loop.size])!r} {loop.times} times in a row"
        )
        text = " ".join(s.text for s in segments[first : last + 1])
        flag = _flag(LOOP, segments[first].start, segments[last].end, text, why)
        findings.append(Finding(first, last, flag, loop.size * (loop.times - 1)))
    for i, segment in enumerate(segments):
        if not segment.text.strip():
            findings.append(Finding(i, i, _flag(EMPTY, segment.start, segment.end, "", "no text"), 1))
        elif is_filler(segment.text):
            flag = _flag(FILLER, segment.start, segment.end, segment.text, FILLER_WHY)
            findings.append(Finding(i, i, flag, max(1, len(words(segment.text)))))
    return sorted(findings, key=lambda f: (f.flag.start, f.flag.end, f.flag.check))


def segment_flags(segments: Sequence[Span]) -> list[Flag]:
    """Loops, empty segments and filler-only segments, in time order."""
    return [finding.flag for finding in segment_findings(segments)]


def unflagged_words(segments: Sequence[Span]) -> list[str]:
    """The words no segment check flags: outside every loop, and no filler word."""
    tokens = [word for word, _ in _indexed_words(segments)]
    looped = {i for loop in _loops(tokens) for i in range(loop.at, loop.at + loop.size * loop.times)}
    return [word for i, word in enumerate(tokens) if i not in looped and word not in FILLER_WORDS]


def timing_flags(start: float, end: float, text: str, limits: Limits, checks: Sequence[str]) -> list[Flag]:
    """The timing checks among `checks` on one cue or segment: reading speed and time on screen."""
    duration = end - start
    flags: list[Flag] = []
    cps = len(text) / duration if duration > 0 else float("inf")
    if MAX_CPS in checks and text and cps > limits.max_cps + EPSILON:
        why = f"{cps:.1f} characters per second, above {limits.max_cps:g}"
        flags.append(_flag(MAX_CPS, start, end, text, why))
    if MIN_DURATION in checks and duration < limits.min_cue_duration - EPSILON:
        why = f"{duration:.3f} s on screen, under {limits.min_cue_duration:g} s"
        flags.append(_flag(MIN_DURATION, start, end, text, why))
    if MAX_DURATION in checks and duration > limits.max_cue_duration + EPSILON:
        why = f"{duration:.3f} s on screen, over {limits.max_cue_duration:g} s"
        flags.append(_flag(MAX_DURATION, start, end, text, why))
    return flags


def segment_timing_flags(segments: Sequence[Span], limits: Limits) -> list[Flag]:
    """The transcript's timing checks (reading speed, time on screen) on each segment with text."""
    timing = (MAX_CPS, MIN_DURATION)
    return [
        f for s in segments if s.text.strip() for f in timing_flags(s.start, s.end, s.text, limits, timing)
    ]


def cue_flags(cues: Sequence[Cue], limits: Limits) -> list[Flag]:
    """Every subtitle check but loops (those run on segments) on each cue, in time order."""
    flags: list[Flag] = []
    for cue in cues:
        text = cue_text(cue)
        if not text:
            flags.append(_flag(EMPTY, cue.start, cue.end, "", "no text"))
            continue
        if is_filler(text):
            flags.append(_flag(FILLER, cue.start, cue.end, text, FILLER_WHY))
        flags.extend(timing_flags(cue.start, cue.end, text, limits, SUBTITLE_CHECKS))
    return flags
