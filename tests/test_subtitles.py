"""The pure subtitle core: cue building, SRT/WebVTT rendering, parsing and validation."""

from __future__ import annotations

import re

import pytest

from workers.subtitles import (
    Cue,
    Segment,
    SubtitleError,
    Word,
    build_cues,
    chunk_cues,
    parse_srt,
    parse_vtt,
    renumber,
    to_srt,
    to_vtt,
    validate_srt,
    validate_vtt,
    wrap_text,
)

SAMPLE = [Cue(1, 1.0, 2.5, ["Hello", "world"]), Cue(2, 3661.042, 3662.0, ["Bye"])]
SAMPLE_SRT = "1\n00:00:01,000 --> 00:00:02,500\nHello\nworld\n\n2\n01:01:01,042 --> 01:01:02,000\nBye\n"
SAMPLE_VTT = (
    "WEBVTT\n\n1\n00:00:01.000 --> 00:00:02.500\nHello\nworld\n\n2\n01:01:01.042 --> 01:01:02.000\nBye\n"
)


def test_wrap_text_breaks_at_spaces_within_the_limit() -> None:
    assert wrap_text("the quick brown fox jumps over the lazy dog", 10) == [
        "the quick",
        "brown fox",
        "jumps over",
        "the lazy",
        "dog",
    ]


def test_wrap_text_keeps_a_long_word_whole_on_its_own_line() -> None:
    assert wrap_text("a supercalifragilistic b", 10) == ["a", "supercalifragilistic", "b"]
    assert wrap_text("  a \n  b  ", 10) == ["a b"]
    assert wrap_text("   ", 10) == []


def test_short_segment_becomes_one_cue() -> None:
    cues = build_cues([Segment(1.0, 2.5, " Hello world. ")])
    assert cues == [Cue(1, 1.0, 2.5, ["Hello world."])]


def test_segment_wraps_into_two_lines_of_one_cue() -> None:
    cues = build_cues([Segment(0.0, 3.0, "the quick brown fox")], max_line_length=10)
    assert cues == [Cue(1, 0.0, 3.0, ["the quick", "brown fox"])]


def test_long_segment_splits_at_word_timestamps() -> None:
    names = ["one", "two", "three", "four", "five", "six"]
    words = [Word(float(i), i + 0.8, " " + name) for i, name in enumerate(names)]
    segment = Segment(0.0, 6.0, " one two three four five six", words)
    cues = build_cues([segment], max_line_length=9, max_lines_per_cue=1)
    assert cues == [
        Cue(1, 0.0, 1.8, ["one two"]),
        Cue(2, 2.0, 2.8, ["three"]),
        Cue(3, 3.0, 4.8, ["four five"]),
        Cue(4, 5.0, 5.8, ["six"]),
    ]


def test_long_segment_without_words_splits_by_character_count() -> None:
    # "abc " + "defgh " + "ij" is 12 characters over 6 seconds: half a second each.
    cues = build_cues([Segment(0.0, 6.0, "abc defgh ij")], max_line_length=5, max_lines_per_cue=1)
    assert cues == [
        Cue(1, 0.0, 2.0, ["abc"]),
        Cue(2, 2.0, 5.0, ["defgh"]),
        Cue(3, 5.0, 6.0, ["ij"]),
    ]


def test_max_cue_duration_splits_proportionally() -> None:
    # 15 characters over 15 seconds: "aaa " 0-4, "bbb " 4-8, "ccc " 8-12, "ddd" 12-15.
    cues = build_cues([Segment(0.0, 15.0, "aaa bbb ccc ddd")], max_cue_duration=7.0)
    assert cues == [
        Cue(1, 0.0, 4.0, ["aaa"]),
        Cue(2, 4.0, 8.0, ["bbb"]),
        Cue(3, 8.0, 15.0, ["ccc ddd"]),
    ]


def test_max_cue_duration_splits_at_word_timestamps_and_joins_plain_words_with_spaces() -> None:
    words = [Word(0.0, 2.0, "a"), Word(2.5, 4.5, "b"), Word(5.0, 7.0, "c"), Word(7.5, 9.0, "d")]
    cues = build_cues([Segment(0.0, 9.0, "a b c d", words)], max_cue_duration=5.0)
    assert cues == [Cue(1, 0.0, 4.5, ["a b"]), Cue(2, 5.0, 9.0, ["c d"])]


def test_overlapping_and_zero_length_segments_are_clamped() -> None:
    segments = [
        Segment(0.0, 2.0, "first"),
        Segment(1.5, 3.0, "second"),
        Segment(2.0, 2.5, "third"),
        Segment(-1.0, -0.5, "fourth"),
    ]
    assert build_cues(segments) == [
        Cue(1, 0.0, 2.0, ["first"]),
        Cue(2, 2.0, 3.0, ["second"]),
        Cue(3, 3.0, 3.001, ["third"]),
        Cue(4, 3.001, 3.002, ["fourth"]),
    ]


def test_blank_segments_and_blank_words_are_skipped() -> None:
    segments = [
        Segment(0.0, 1.0, "   "),
        Segment(1.0, 2.0, "hi"),
        Segment(2.0, 3.0, "", [Word(2.0, 3.0, " ")]),
        Segment(3.0, 4.0, "\n"),
    ]
    assert build_cues(segments) == [Cue(1, 1.0, 2.0, ["hi"])]
    assert build_cues([]) == []


def test_build_cues_rounds_times_to_milliseconds() -> None:
    assert build_cues([Segment(0.12345, 1.98765, "x")]) == [Cue(1, 0.123, 1.988, ["x"])]


def test_build_cues_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_line_length"):
        build_cues([Segment(0.0, 1.0, "x")], max_line_length=0)
    with pytest.raises(ValueError, match="max_cue_duration"):
        build_cues([Segment(0.0, 1.0, "x")], max_cue_duration=0.0)


def test_to_srt_exact() -> None:
    assert to_srt(SAMPLE) == SAMPLE_SRT
    assert to_srt([]) == ""


def test_to_vtt_exact() -> None:
    assert to_vtt(SAMPLE) == SAMPLE_VTT
    assert to_vtt([]) == "WEBVTT\n"


def test_round_trip_through_srt_and_vtt() -> None:
    words = [Word(i * 0.7, i * 0.7 + 0.5, f" word{i}") for i in range(30)]
    segments = [
        Segment(0.0, 21.0, " ".join(w.word.strip() for w in words), words),
        Segment(20.5, 31.333, "a rather long segment without word timestamps " * 4),
        Segment(31.0, 31.0, "instant"),
    ]
    cues = build_cues(segments)
    assert [(c.start, c.end) for c in cues] == [
        (0.0, 6.8),
        (7.0, 13.8),
        (14.0, 20.8),
        (20.8, 24.999),
        (24.999, 29.498),
        (29.498, 31.333),
        (31.333, 31.334),
    ]
    assert cues[3].lines == ["a rather long segment without word", "timestamps a rather long segment without"]
    assert parse_srt(to_srt(cues)) == cues
    assert parse_vtt(to_vtt(cues)) == cues
    assert validate_srt(to_srt(cues)) == cues
    assert validate_vtt(to_vtt(cues)) == cues
    assert parse_srt(SAMPLE_SRT) == SAMPLE
    assert parse_vtt(SAMPLE_VTT) == SAMPLE


def test_parse_srt_tolerates_bom_crlf_and_extra_blank_lines() -> None:
    text = (
        "\ufeff\r\n\r\n1\r\n00:00:01,000 --> 00:00:02,000\r\nHello  \r\n\r\n\r\n\r\n"
        "2\r\n00:00:02,500 --> 00:00:03,000\r\nWorld\r\nagain\r\n\r\n\r\n"
    )
    expected = [Cue(1, 1.0, 2.0, ["Hello"]), Cue(2, 2.5, 3.0, ["World", "again"])]
    assert parse_srt(text) == expected
    assert validate_srt(text) == expected
    assert parse_srt("\ufeff") == []
    assert validate_srt("") == []


def test_parse_vtt_skips_notes_and_accepts_settings_and_missing_identifiers() -> None:
    text = (
        "\ufeffWEBVTT - a title\r\n\r\nNOTE made by hand\r\n\r\n"
        "00:01.000 --> 00:02.000 align:start\r\nHello\r\n\r\nintro\r\n00:00:03.000 --> 00:00:04.000\r\nBye\r\n"
    )
    expected = [Cue(1, 1.0, 2.0, ["Hello"]), Cue(2, 3.0, 4.0, ["Bye"])]
    assert parse_vtt(text) == expected
    assert validate_vtt(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is not a subtitle", "line 1: expected a cue number, got 'this is not a subtitle'"),
        (
            "\n\n1\nnot a timing\nHello\n",
            "line 4: expected 'HH:MM:SS,mmm --> HH:MM:SS,mmm', got 'not a timing'",
        ),
        ("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n", "line 6: cue 2 has no timing line"),
        ("1\n00:61:00,000 --> 00:62:00,000\nx\n", "line 2: minutes and seconds must be below 60"),
        ("1\r\n00:00:01,000 -> 00:00:02,000\r\nx\r\n", "line 2: expected 'HH:MM:SS,mmm"),
    ],
)
def test_parse_srt_rejects_malformed_input_with_line_number(text: str, message: str) -> None:
    with pytest.raises(SubtitleError, match=re.escape(message)):
        parse_srt(text)


def test_parse_vtt_rejects_missing_header_and_bad_timing() -> None:
    with pytest.raises(SubtitleError, match=re.escape("line 1: expected the 'WEBVTT' header")):
        parse_vtt("1\n00:00:01.000 --> 00:00:02.000\nHello\n")
    with pytest.raises(SubtitleError, match=re.escape("line 1: expected the 'WEBVTT' header")):
        parse_vtt("")
    with pytest.raises(SubtitleError, match=re.escape("line 4: expected 'HH:MM:SS,mmm --> HH:MM:SS,mmm'")):
        parse_vtt("WEBVTT\n\nid\n00:00:01 --> 00:00:02\nHello\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "1\n00:00:01,000 --> 00:00:02,000\na\n\n3\n00:00:03,000 --> 00:00:04,000\nb\n",
            "cue 2: numbered 3, expected 2",
        ),
        (
            "1\n00:00:01,000 --> 00:00:02,000\na\n\n2\n00:00:01,500 --> 00:00:04,000\nb\n",
            "cue 2: starts at 00:00:01,500 before cue 1 ends at 00:00:02,000",
        ),
        (
            "1\n00:00:01,000 --> 00:00:02,000\na\n\n2\n00:00:03,000 --> 00:00:04,000\n\n",
            "cue 2 is empty",
        ),
        ("1\n00:00:02,000 --> 00:00:02,000\na\n", "cue 1: end 00:00:02,000 is not after start 00:00:02,000"),
        ("garbage\n", "line 1: expected a cue number, got 'garbage'"),
    ],
)
def test_validate_srt_names_the_bad_cue(text: str, message: str) -> None:
    with pytest.raises(SubtitleError, match=re.escape(message)):
        validate_srt(text)


def test_validate_vtt_names_the_bad_cue() -> None:
    overlapping = "WEBVTT\n\n00:00:01.000 --> 00:00:03.000\na\n\n00:00:02.000 --> 00:00:04.000\nb\n"
    with pytest.raises(SubtitleError, match=re.escape("cue 2: starts at 00:00:02,000 before cue 1 ends")):
        validate_vtt(overlapping)
    misnumbered = "WEBVTT\n\n2\n00:00:01.000 --> 00:00:02.000\na\n"
    with pytest.raises(SubtitleError, match=re.escape("cue 1: numbered 2, expected 1")):
        validate_vtt(misnumbered)


def test_subtitle_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_srt("nonsense")


def test_chunk_cues_and_renumber() -> None:
    cues = [Cue(i, float(i), i + 0.5, [f"line {i}"]) for i in range(1, 6)]
    chunks = chunk_cues(cues, 2)
    assert [[c.index for c in chunk] for chunk in chunks] == [[1, 2], [3, 4], [5]]
    assert chunk_cues(cues, 10) == [cues]
    assert chunk_cues([], 3) == []
    with pytest.raises(ValueError, match="chunk size must be >= 1, got 0"):
        chunk_cues(cues, 0)
    assert [c.index for c in renumber(chunks[2] + chunks[0])] == [1, 2, 3]
    assert renumber(chunks[2])[0] == Cue(1, 5.0, 5.5, ["line 5"])
    assert cues[4].index == 5
