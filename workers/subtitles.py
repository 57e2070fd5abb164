"""Subtitle core: whisper-like segments to numbered cues, SRT/WebVTT writing, parsing and validation.

Everything here is pure (strings and msgspec structs in, the same out); the `generate_srt` and
`fix_srt` operations do the I/O around it. Cue times are seconds held to millisecond precision,
so `parse_srt(to_srt(cues)) == cues` for any cues that `build_cues` produced.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import msgspec


class SubtitleError(ValueError):
    """Malformed or invalid subtitle text."""


class Word(msgspec.Struct):
    """One transcribed word with its times in seconds."""

    start: float
    end: float
    word: str


class Segment(msgspec.Struct):
    """A whisper-like transcript segment; `words` carries word timestamps when the model gave them."""

    start: float
    end: float
    text: str
    words: list[Word] | None = None


class Cue(msgspec.Struct):
    """One subtitle cue: its number, times in seconds (millisecond precision) and text lines."""

    index: int
    start: float
    end: float
    lines: list[str]


# (text, start, end) of one word, timed from the model or estimated from its character offset.
_Token = tuple[str, float, float]

_TIMESTAMP = r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{3})"
# Trailing text after the end time is tolerated: WebVTT cue settings, legacy SRT box coordinates.
_TIMING = re.compile(rf"{_TIMESTAMP}[ \t]*-->[ \t]*{_TIMESTAMP}(?:[ \t]+.*)?")
_VTT_HEADER = re.compile(r"WEBVTT(?:[ \t].*)?")
_VTT_SKIPPED_BLOCK = re.compile(r"(?:NOTE|STYLE|REGION)(?:[ \t].*)?")


def wrap_text(text: str, max_line_length: int = 42) -> list[str]:
    """Greedily wrap `text` at whitespace into lines of at most `max_line_length` characters."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) <= max_line_length:
            current += " " + word
        else:
            # A word longer than the limit still lands here, alone and unbroken, on its own line.
            if current:
                lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def build_cues(
    segments: Sequence[Segment],
    max_line_length: int = 42,
    max_lines_per_cue: int = 2,
    max_cue_duration: float = 7.0,
) -> list[Cue]:
    """Turn transcript segments into wrapped, size-limited, non-overlapping cues numbered from 1."""
    if max_line_length < 1 or max_lines_per_cue < 1 or max_cue_duration <= 0:
        raise ValueError("max_line_length and max_lines_per_cue must be >= 1, max_cue_duration > 0")
    pieces: list[tuple[float, float, list[str]]] = []
    for segment in segments:
        lines = wrap_text(segment.text, max_line_length)
        if not lines:
            continue
        if len(lines) <= max_lines_per_cue and segment.end - segment.start <= max_cue_duration:
            pieces.append((segment.start, segment.end, lines))
            continue
        tokens, sep = _timed_tokens(segment)
        pieces.extend(_pack(tokens, sep, max_line_length, max_lines_per_cue, max_cue_duration))

    cues: list[Cue] = []
    previous_end = 0
    for start, end, lines in pieces:
        # Whisper segments and word times can overlap or be zero-length; players need neither.
        start_ms = max(_ms(start), previous_end)
        end_ms = max(_ms(end), start_ms + 1)
        cues.append(Cue(len(cues) + 1, start_ms / 1000, end_ms / 1000, lines))
        previous_end = end_ms
    return cues


def _timed_tokens(segment: Segment) -> tuple[list[_Token], str]:
    """The segment's words with times, and the separator that rejoins them into text."""
    words = [w for w in segment.words or [] if w.word.strip()]
    if words:
        # faster-whisper words carry their own leading space ("' world'"), and none in
        # languages written without spaces; plain words given without it need one between.
        sep = "" if any(w.word[:1].isspace() for w in words) else " "
        return [(w.word, w.start, w.end) for w in words], sep
    texts = segment.text.split()
    total = len(" ".join(texts))
    duration = segment.end - segment.start
    tokens: list[_Token] = []
    offset = 0
    for i, text in enumerate(texts):
        start = segment.start + duration * offset / total
        # Each word owns its trailing space, so consecutive pieces tile the segment with no gaps.
        offset += len(text) + (1 if i < len(texts) - 1 else 0)
        tokens.append((text, start, segment.start + duration * offset / total))
    return tokens, " "


def _pack(
    tokens: list[_Token], sep: str, max_line_length: int, max_lines: int, max_duration: float
) -> list[tuple[float, float, list[str]]]:
    """Group consecutive tokens greedily into pieces that fit the line and duration limits."""
    pieces: list[tuple[float, float, list[str]]] = []
    group: list[_Token] = []
    for token in tokens:
        if group:
            too_long = len(wrap_text(sep.join(t[0] for t in [*group, token]), max_line_length)) > max_lines
            if too_long or token[2] - group[0][1] > max_duration:
                pieces.append(_piece(group, sep, max_line_length))
                group = []
        group.append(token)
    if group:
        pieces.append(_piece(group, sep, max_line_length))
    return pieces


def _piece(group: list[_Token], sep: str, max_line_length: int) -> tuple[float, float, list[str]]:
    """A group of tokens as (start, end, wrapped lines)."""
    return group[0][1], group[-1][2], wrap_text(sep.join(t[0] for t in group), max_line_length)


def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds."""
    return round(seconds * 1000)


def _format_time(seconds: float, decimal: str) -> str:
    """`HH:MM:SS<decimal>mmm` for a time in seconds."""
    hours, rest = divmod(_ms(seconds), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _blocks(cues: Sequence[Cue], decimal: str) -> list[str]:
    """Each cue as a number line, a timing line and its text lines."""
    return [
        "\n".join(
            [
                str(cue.index),
                f"{_format_time(cue.start, decimal)} --> {_format_time(cue.end, decimal)}",
                *cue.lines,
            ]
        )
        for cue in cues
    ]


def to_srt(cues: Sequence[Cue]) -> str:
    """Render cues as SubRip text."""
    blocks = _blocks(cues, ",")
    return "\n\n".join(blocks) + "\n" if blocks else ""


def to_vtt(cues: Sequence[Cue]) -> str:
    """Render cues as WebVTT text, cue numbers kept as identifiers."""
    return "\n\n".join(["WEBVTT", *_blocks(cues, ".")]) + "\n"


def _split_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, non-blank lines) for each blank-line-separated block."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    block: list[str] = []
    first = 0
    for number, line in enumerate(lines, 1):
        if line.strip():
            if not block:
                first = number
            block.append(line.strip())
        elif block:
            yield first, block
            block = []
    if block:
        yield first, block


def _parse_timing(line: str, lineno: int) -> tuple[float, float]:
    """Parse a `start --> end` line into seconds."""
    match = _TIMING.fullmatch(line)
    if match is None:
        raise SubtitleError(f"line {lineno}: expected 'HH:MM:SS,mmm --> HH:MM:SS,mmm', got {line!r}")
    times: list[float] = []
    for hours, minutes, seconds, millis in (match.groups()[:4], match.groups()[4:]):
        if int(minutes) >= 60 or int(seconds) >= 60:
            raise SubtitleError(f"line {lineno}: minutes and seconds must be below 60 in {line!r}")
        ms = ((int(hours or 0) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int(millis)
        times.append(ms / 1000)
    return times[0], times[1]


def _is_number(text: str) -> bool:
    """Whether `text` is a plain ASCII cue number."""
    return text.isascii() and text.isdigit()


def parse_srt(text: str) -> list[Cue]:
    """Parse SubRip text, tolerating a BOM, CRLF line ends and extra blank lines."""
    cues: list[Cue] = []
    for lineno, block in _split_blocks(text):
        if not _is_number(block[0]):
            raise SubtitleError(f"line {lineno}: expected a cue number, got {block[0]!r}")
        if len(block) < 2:
            raise SubtitleError(f"line {lineno + 1}: cue {block[0]} has no timing line")
        start, end = _parse_timing(block[1], lineno + 1)
        cues.append(Cue(int(block[0]), start, end, block[2:]))
    return cues


def parse_vtt(text: str) -> list[Cue]:
    """Parse WebVTT text; cues without a numeric identifier are numbered by position."""
    blocks = _split_blocks(text)
    header = next(blocks, None)
    if header is None or not _VTT_HEADER.fullmatch(header[1][0]):
        raise SubtitleError(f"line {header[0] if header else 1}: expected the 'WEBVTT' header")
    cues: list[Cue] = []
    for lineno, block in blocks:
        if _VTT_SKIPPED_BLOCK.fullmatch(block[0]):
            continue
        timing = 0 if "-->" in block[0] else 1
        if timing >= len(block):
            raise SubtitleError(f"line {lineno + 1}: cue {block[0]!r} has no timing line")
        start, end = _parse_timing(block[timing], lineno + timing)
        index = int(block[0]) if timing and _is_number(block[0]) else len(cues) + 1
        cues.append(Cue(index, start, end, block[timing + 1 :]))
    return cues


def _check(cues: list[Cue]) -> list[Cue]:
    """Raise unless cues are numbered 1..n, non-empty, and timed monotonically without overlap."""
    previous_end: float | None = None
    for position, cue in enumerate(cues, 1):
        if cue.index != position:
            raise SubtitleError(f"cue {position}: numbered {cue.index}, expected {position}")
        if not any(line.strip() for line in cue.lines):
            raise SubtitleError(f"cue {position} is empty")
        start, end = _format_time(cue.start, ","), _format_time(cue.end, ",")
        if _ms(cue.end) <= _ms(cue.start):
            raise SubtitleError(f"cue {position}: end {end} is not after start {start}")
        if previous_end is not None and _ms(cue.start) < _ms(previous_end):
            previous = _format_time(previous_end, ",")
            raise SubtitleError(
                f"cue {position}: starts at {start} before cue {position - 1} ends at {previous}"
            )
        previous_end = cue.end
    return cues


def validate_srt(text: str) -> list[Cue]:
    """Parse SubRip text and check it is well-formed; an empty file is valid and gives no cues."""
    return _check(parse_srt(text))


def validate_vtt(text: str) -> list[Cue]:
    """Parse WebVTT text and check it is well-formed; a header alone is valid and gives no cues."""
    return _check(parse_vtt(text))


def read_subtitles(text: str) -> list[Cue]:
    """Parse and check SubRip or WebVTT text, told apart by the WEBVTT header. WebVTT cue
    identifiers are free text, so its cues are numbered 1..n by position; SubRip's must be already."""
    first = next(_split_blocks(text), None)
    if first is not None and _VTT_HEADER.fullmatch(first[1][0]):
        return _check(renumber(parse_vtt(text)))
    return validate_srt(text)


def chunk_cues(cues: Sequence[Cue], size: int) -> list[list[Cue]]:
    """Split cues into consecutive chunks of at most `size`, e.g. one per LLM request."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [list(cues[i : i + size]) for i in range(0, len(cues), size)]


def renumber(cues: Sequence[Cue]) -> list[Cue]:
    """Copies of cues numbered 1..n in order, e.g. after rejoining fixed chunks."""
    return [msgspec.structs.replace(cue, index=i) for i, cue in enumerate(cues, 1)]
