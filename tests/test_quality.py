"""The subtitle quality gate on synthetic segment lists, and its safer re-run on jfk.flac's real audio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from streams import GenerateSrtParams, InvalidParamsError, TranscribeParams, cache_key, parse_params
from tests.conftest import WorkerRunner, submit, wait_terminal
from tests.test_media_ops import FAST, download, upload
from workers import quality, subtitles
from workers.quality import Flag, Limits
from workers.subtitles import Cue, Segment
from workers.whisper import ModelCache, TranscriptSegment, transcribe_ranges

JFK = Path(__file__).resolve().parents[2] / "shared" / "media" / "jfk.flac"
LIMITS = Limits()


def checks(flags: list[Flag]) -> list[str]:
    """The check names of flags, in order."""
    return [f.check for f in flags]


def test_a_loop_within_one_segment_is_found_with_its_phrase() -> None:
    looped = Segment(2.0, 6.0, "Thank you for watching. " * 5)
    flags = quality.segment_flags([Segment(0.0, 2.0, "Hello there."), looped])
    assert checks(flags) == ["loop"]
    assert (flags[0].start, flags[0].end) == (2.0, 6.0)
    assert flags[0].why == "'thank you for watching' 5 times in a row"


def test_a_loop_across_segments_spans_them() -> None:
    segments = [Segment(float(i), i + 1.0, "I'm going home.") for i in range(4)]
    flags = quality.segment_flags([Segment(-1.0, 0.0, "So."), *segments])
    assert checks(flags) == ["loop"]
    assert (flags[0].start, flags[0].end) == (0.0, 4.0)
    assert "4 times in a row" in flags[0].why


def test_speech_that_repeats_a_word_thrice_is_no_loop() -> None:
    assert quality.segment_flags([Segment(0.0, 2.0, "No, no, no. Ask not what you can do.")]) == []
    assert checks(quality.segment_flags([Segment(0.0, 2.0, "no no no no")])) == ["loop"]


def test_empty_and_filler_only_segments_and_cues_are_found() -> None:
    segments = [Segment(0.0, 1.0, ""), Segment(1.0, 2.0, "Um... uh."), Segment(2.0, 3.0, "♪"),
                Segment(3.0, 4.0, "Yes, I am here.")]  # fmt: skip
    assert checks(quality.segment_flags(segments)) == ["empty", "filler", "filler"]
    cues = [Cue(1, 0.0, 1.0, []), Cue(2, 1.0, 2.0, ["..."]), Cue(3, 2.0, 3.0, ["Fine."])]
    assert checks(quality.cue_flags(cues, LIMITS)) == ["empty", "filler"]


def test_a_fast_cue_a_short_cue_and_a_long_cue_are_found() -> None:
    forty = "a" * 19 + " " + "b" * 20  # 40 characters
    cues = [Cue(1, 0.0, 0.5, [forty]), Cue(2, 1.0, 1.3, ["Hi."]), Cue(3, 2.0, 27.0, ["word " * 20])]
    flags = quality.cue_flags(cues, LIMITS)
    assert [(f.check, f.start) for f in flags] == [
        ("max_cps", 0.0), ("min_duration", 0.0), ("min_duration", 1.0), ("max_duration", 2.0),
    ]  # fmt: skip
    assert flags[0].why == "80.0 characters per second, above 20"
    assert flags[3].why == "25.000 s on screen, over 7 s"


def test_a_fast_cue_is_extended_into_the_gap_after_it() -> None:
    forty = "a" * 19 + " " + "b" * 20
    cues = [Cue(1, 1.0, 1.5, [forty]), Cue(2, 5.0, 7.0, ["Later on."])]
    fixed_cues, fixed = quality.fix_timing(cues, LIMITS)
    assert [(c.start, c.end) for c in fixed_cues] == [(1.0, 3.0), (5.0, 7.0)]  # 40 chars at 20 cps
    assert checks(fixed) == ["max_cps", "min_duration"]
    assert all(f.how and f.how.startswith("shown longer") for f in fixed)
    assert quality.cue_flags(fixed_cues, LIMITS) == []


def test_a_fast_cue_without_a_gap_is_merged_with_its_neighbour() -> None:
    cues = [Cue(1, 0.0, 0.4, ["Wait, stop it now!"]), Cue(2, 0.4, 3.0, ["Okay."]), Cue(3, 3.0, 5.0, ["Go."])]
    fixed_cues, fixed = quality.fix_timing(cues, LIMITS)
    assert [(c.index, c.start, c.end, c.lines) for c in fixed_cues] == [
        (1, 0.0, 3.0, ["Wait, stop it now! Okay."]), (2, 3.0, 5.0, ["Go."]),
    ]  # fmt: skip
    assert {f.how for f in fixed} == {"merged with the next cue"}
    assert quality.cue_flags(fixed_cues, LIMITS) == []


def test_a_short_cue_that_fits_nowhere_is_left_flagged() -> None:
    long_line = "x" * 40 + " " + "y" * 40  # a neighbour already two full lines: no room to merge
    cues = [Cue(1, 0.0, 5.0, [long_line]), Cue(2, 5.0, 5.3, ["Hi."]), Cue(3, 5.3, 10.0, [long_line])]
    fixed_cues, fixed = quality.fix_timing(cues, LIMITS)
    assert fixed == []
    assert [(f.check, f.start) for f in quality.cue_flags(fixed_cues, LIMITS)] == [("min_duration", 5.0)]


def test_a_25_s_cue_is_split_and_a_single_long_word_shortened() -> None:
    cues = [Cue(1, 0.0, 25.0, ["one two three four five six seven eight nine ten eleven twelve"]),
            Cue(2, 30.0, 55.0, ["Aaaah."])]  # fmt: skip
    fixed_cues, fixed = quality.fix_timing(cues, LIMITS)
    assert [f.how for f in fixed] == ["split into 4 cues", "shortened to 7 s (one word cannot be split)"]
    assert all(c.end - c.start <= 7.0 for c in fixed_cues)
    assert " ".join(" ".join(c.lines) for c in fixed_cues[:-1]).split()[-1] == "twelve"
    assert (fixed_cues[-1].start, fixed_cues[-1].end) == (30.0, 37.0)
    assert quality.cue_flags(fixed_cues, LIMITS) == []
    subtitles.validate_srt(subtitles.to_srt(fixed_cues))


def test_empty_cues_are_dropped() -> None:
    fixed_cues, fixed = quality.fix_timing([Cue(1, 0.0, 1.0, []), Cue(2, 1.0, 3.0, ["Here."])], LIMITS)
    assert [(c.index, c.lines) for c in fixed_cues] == [(1, ["Here."])]
    assert [(f.check, f.how) for f in fixed] == [("empty", "dropped")]


def test_the_rerun_is_kept_only_where_it_is_better() -> None:
    segments = [Segment(0.0, 2.0, "Good morning."), Segment(2.0, 6.0, "go on " * 6),
                Segment(6.0, 8.0, "Um."), Segment(8.0, 9.0, "Fine."), Segment(9.0, 10.0, "")]  # fmt: skip
    asked: list[list[tuple[float, float]]] = []

    def rerun(ranges: list[tuple[float, float]]) -> list[list[Segment]]:
        asked.append(ranges)
        # The loop comes back as words, the filler as nothing, the empty segment as filler again.
        return [[Segment(2.2, 5.5, "Go on, tell me.")], [Segment(9.0, 10.0, "Uh.")]]

    repaired, repair = quality.repair_segments(segments, rerun)
    assert asked == [[(2.0, 8.0), (9.0, 10.0)]]  # the loop and the filler next to it are one range
    assert [s.text for s in repaired] == ["Good morning.", "Go on, tell me.", "Fine.", ""]
    assert (repair.ranges, repair.kept, repair.skipped) == (2, 1, 0)
    assert checks(repair.found) == ["loop", "filler", "empty"]
    assert [(f.check, f.how) for f in repair.fixed] == [
        ("loop", "re-transcribed with safer decoding"), ("filler", "re-transcribed with safer decoding"),
    ]  # fmt: skip


def test_a_rerun_hearing_nothing_removes_a_hallucination() -> None:
    segments = [Segment(0.0, 3.0, "Hello."), Segment(20.0, 30.0, "Thank you. " * 4)]
    repaired, repair = quality.repair_segments(segments, lambda ranges: [[] for _ in ranges])
    assert [s.text for s in repaired] == ["Hello."]
    assert [f.how for f in repair.fixed] == ["removed: the safer re-run heard no speech"]


def test_the_subtitle_gate_reports_bounded_lists_whose_counts_match() -> None:
    segments = [
        Segment(i * 2.0, i * 2.0 + 0.3, f"Line number {i} is far too quick to read.") for i in range(30)
    ]
    repair = quality.Repair(found=[], fixed=[])
    cues, report = quality.subtitle_gate(segments, repair, LIMITS, media_end=61.0)
    assert report["enabled"] is True
    assert report["checks"] == list(quality.SUBTITLE_CHECKS)
    assert report["found"]["count"] == 60  # each cue too fast and too short
    assert len(report["found"]["flags"]) == quality.MAX_LISTED_FLAGS
    assert report["fixed"]["count"] == 60
    assert report["left"] == {"count": 0, "flags": []}
    assert report["limits"] == msgspec.to_builtins(LIMITS)
    assert len(msgspec.json.encode(report)) < 16_000
    subtitles.validate_srt(subtitles.to_srt(cues))


def test_quality_params_are_strict_and_decide_the_cache_key() -> None:
    assert parse_params({}, GenerateSrtParams).quality_gate is True
    assert (parse_params({}, TranscribeParams).max_cps, parse_params({}, TranscribeParams).min_cue_duration) == (
        20.0, 0.7,
    )  # fmt: skip
    for bad in ({"quality_gate": 1}, {"quality_gate": "false"}, {"min_cue_duration": 7.0}):
        with pytest.raises(InvalidParamsError):
            parse_params(bad, GenerateSrtParams)
    keys = {cache_key("generate_srt", "0" * 64, p) for p in ({}, {"quality_gate": False}, {"max_cps": 15})}
    assert len(keys) == 3


@pytest.mark.slow
def test_the_safer_rerun_replaces_a_synthetic_loop_with_the_models_words() -> None:
    """jfk.flac's real audio under a looped transcript: the gate's re-run hears the speech again."""
    looped = [TranscriptSegment(0.0, 11.0, "And so, my fellow Americans. " * 6)]
    cache = ModelCache(cpu_threads=2)

    def rerun(ranges: list[tuple[float, float]]) -> list[list[TranscriptSegment]]:
        return transcribe_ranges(JFK, ranges, language="en", beam_size=1, device="cpu", compute_type="int8",
                                 cache=cache)  # fmt: skip

    repaired, repair = quality.repair_segments(looped, rerun)
    assert checks(repair.found) == ["loop"]
    assert repair.kept == 1
    assert quality.segment_flags(repaired) == []
    text = " ".join(s.text for s in repaired).lower()
    assert "ask not what your country can do for you" in text
    assert all(0.0 <= s.start < s.end <= 11.0 for s in repaired)


def assert_counts_match(section: dict[str, Any]) -> None:
    """Each list of a `quality` section holds its count's flags, up to the bound."""
    for name in ("found", "fixed", "left"):
        listed = section[name]
        assert len(listed["flags"]) == min(listed["count"], quality.MAX_LISTED_FLAGS), name
        for flag in listed["flags"]:
            assert flag["check"] in section["checks"], flag
            assert flag["start"] <= flag["end"], flag
            assert flag["why"], flag
            assert (flag["how"] is not None) == (name == "fixed"), flag


@pytest.mark.slow
async def test_generate_srt_and_transcribe_report_quality_unless_it_is_off(
    client: httpx.AsyncClient, gpu: WorkerRunner
) -> None:
    source = await upload(client, "jfk.flac", JFK.read_bytes())
    on = await submit(client, type="generate_srt", file_id=source["id"], params=FAST)
    off = await submit(
        client, type="generate_srt", file_id=source["id"], params={**FAST, "quality_gate": False}
    )
    text = await submit(client, type="transcribe", file_id=source["id"], params=FAST)
    done = [await wait_terminal(client, job["id"], timeout=60) for job in (on, off, text)]
    assert [d["status"] for d in done] == ["completed"] * 3, [d["error"] for d in done]
    section = done[0]["result"]["quality"]
    assert section["enabled"] is True
    assert section["checks"] == list(quality.SUBTITLE_CHECKS)
    assert section["limits"] == {"max_cps": 20.0, "min_cue_duration": 0.7, "max_cue_duration": 7.0,
                                 "max_line_length": 42, "max_lines_per_cue": 2}  # fmt: skip
    assert_counts_match(section)
    assert section["left"]["count"] == 0, section  # JFK's speech is clean, or fixed in place
    srt = next(o for o in done[0]["result"]["outputs"] if o["name"].endswith(".srt"))
    cues = subtitles.validate_srt((await download(client, srt["file_id"])).text)
    assert len(cues) == done[0]["result"]["cues"]
    assert quality.cue_flags(cues, LIMITS) == []
    assert done[1]["result"]["quality"] == {"enabled": False}
    transcript = done[2]["result"]["quality"]
    assert transcript["checks"] == list(quality.TRANSCRIPT_CHECKS)
    assert_counts_match(transcript)
    assert "ask not what your country can do for you" in done[2]["result"]["text"].lower()
    page = (await client.get(f"/ui/jobs/{on['id']}")).text
    assert '<section class="card quality" id="quality">' in page
    found, fixed, left = (section[n]["count"] for n in ("found", "fixed", "left"))
    assert f"Found {found}, fixed {fixed}, left {left}" in " ".join(page.split())
    assert "quality gate was off" in (await client.get(f"/ui/jobs/{off['id']}")).text


@pytest.mark.parametrize("max_cps", [15.0, 17.0, 23.0])
def test_a_cue_shown_longer_meets_any_reading_speed_to_the_millisecond(max_cps: float) -> None:
    limits = Limits(max_cps=max_cps)
    words = " ".join(f"w{i}" for i in range(40))
    for length in range(1, 85):
        start = round(1.0 + length * 0.0137, 3)
        cues = [Cue(1, start, start + 0.1, [words[:length].strip()]), Cue(2, 40.0, 41.0, ["Later."])]
        fixed_cues, fixed = quality.fix_timing(cues, limits)
        assert quality.cue_flags(fixed_cues, limits) == [], (length, fixed_cues)
        assert len(fixed_cues) == 2
        assert all(f.how and f.how.startswith("shown longer") for f in fixed)


def test_an_empty_rerun_does_not_delete_speech_the_checks_did_not_flag() -> None:
    segments = [Segment(0.0, 4.0, "Thank you, thank you, thank you. Please sit down.")]
    repaired, repair = quality.repair_segments(segments, lambda ranges: [[] for _ in ranges])
    assert checks(repair.found) == ["loop"]
    assert [s.text for s in repaired] == [segments[0].text]
    assert (repair.kept, repair.fixed) == (0, [])


def test_a_rerun_that_drops_unflagged_words_loses() -> None:
    segments = [Segment(0.0, 2.0, "Hello."), Segment(2.0, 8.0, "go on " * 6 + "and then we left the house")]
    repaired, repair = quality.repair_segments(segments, lambda ranges: [[Segment(2.0, 3.0, "Go on.")]])
    assert [s.text for s in repaired] == [s.text for s in segments]
    assert repair.kept == 0


def test_a_long_loop_loses_to_a_rerun_with_two_fillers() -> None:
    segments = [Segment(0.0, 20.0, "we will " * 30)]

    def rerun(ranges: list[tuple[float, float]]) -> list[list[Segment]]:
        return [[Segment(0.5, 1.5, "Um."), Segment(2.0, 12.0, "We will fight on, and we shall win."),
                 Segment(14.0, 15.0, "Um.")]]  # fmt: skip

    repaired, repair = quality.repair_segments(segments, rerun)
    assert repair.kept == 1
    assert [s.text for s in repaired][1] == "We will fight on, and we shall win."
    assert checks(repair.fixed) == ["loop"]


def test_a_loop_still_there_after_a_kept_rerun_is_left_not_fixed() -> None:
    segments = [Segment(0.0, 6.0, "go on " * 6), Segment(6.0, 7.0, "Um.")]
    repaired, repair = quality.repair_segments(
        segments, lambda r: [[Segment(0.0, 6.5, "Go on go on go on.")]]
    )
    assert repair.kept == 1
    report = quality.transcript_gate(segments, repaired, repair, LIMITS)
    assert [f["check"] for f in report["fixed"]["flags"]] == ["filler"]
    assert [f["check"] for f in report["left"]["flags"]] == ["loop"]


def test_flagged_ranges_far_apart_are_not_joined_and_loops_go_first() -> None:
    segments = [Segment(60.0, 61.0, "Um."), Segment(600.0, 606.0, "go on " * 6)]
    asked: list[list[tuple[float, float]]] = []
    quality.repair_segments(segments, lambda ranges: asked.append(ranges) or [[] for _ in ranges])
    assert asked == [[(60.0, 61.0), (600.0, 606.0)]]
    fillers = [Segment(i * 10.0, i * 10.0 + 1, "♪") for i in range(quality.MAX_RERUN_RANGES + 5)]
    looped = [*fillers, Segment(1000.0, 1006.0, "go on " * 6)]
    asked.clear()
    _, repair = quality.repair_segments(looped, lambda ranges: asked.append(ranges) or [[] for _ in ranges])
    assert len(asked[0]) == quality.MAX_RERUN_RANGES
    assert (1000.0, 1006.0) in asked[0]
    assert asked[0] == sorted(asked[0])
    assert (repair.ranges, repair.skipped) == (quality.MAX_RERUN_RANGES, 6)


def test_a_failed_rerun_keeps_the_first_transcript_and_says_why() -> None:
    segments = [Segment(0.0, 2.0, "Hello."), Segment(2.0, 8.0, "go on " * 6)]

    def rerun(ranges: list[tuple[float, float]]) -> list[list[Segment]]:
        raise quality.RerunError("could not read audio from a.flac: end of file")

    repaired, repair = quality.repair_segments(segments, rerun)
    assert repaired == segments
    report = quality.transcript_gate(segments, repaired, repair, LIMITS)
    assert report["retranscribed"] == {"ranges": 0, "kept": 0, "skipped": 1,
                                       "skipped_why": "could not read audio from a.flac: end of file"}  # fmt: skip
    assert [f["check"] for f in report["left"]["flags"]] == ["loop"]
    assert report["fixed"]["count"] == 0


def test_a_flags_why_is_cut_like_its_text() -> None:
    phrase = " ".join(f"{w}" * 12 for w in "abcdefgh")  # eight 12-letter words
    flags = quality.segment_flags([Segment(0.0, 9.0, " ".join([phrase] * 3))])
    assert checks(flags) == ["loop"]
    assert len(flags[0].why) <= quality.MAX_FLAG_TEXT
    assert len(flags[0].text) <= quality.MAX_FLAG_TEXT


def test_the_transcript_section_reports_only_the_limits_it_applies() -> None:
    report = quality.transcript_gate([], [], quality.Repair(found=[], fixed=[]), LIMITS)
    assert report["limits"] == {"max_cps": 20.0, "min_cue_duration": 0.7}


def test_cue_duration_params_valid_before_the_gate_stay_valid() -> None:
    short = parse_params({"max_cue_duration": 0.6}, GenerateSrtParams)
    assert short.min_cue_duration < short.max_cue_duration == 0.6
    off = parse_params({"max_cue_duration": 0.7, "quality_gate": False}, GenerateSrtParams)
    assert (off.min_cue_duration, off.max_cue_duration) == (0.7, 0.7)
    for bad in ({"min_cue_duration": 1.0, "max_cue_duration": 0.8}, {"min_cue_duration": 7.0}):
        with pytest.raises(InvalidParamsError, match="min_cue_duration"):
            parse_params(bad, GenerateSrtParams)
    schema = msgspec.json.schema(TranscribeParams)["$defs"]["TranscribeParams"]["properties"]
    for name in ("quality_gate", "max_cps", "min_cue_duration"):  # transcribe reports; generate_srt fixes
        description = schema[name]["description"]
        assert "and fixed" not in description, name
        assert "`generate_srt`" in description, name


def test_a_cancelled_rerun_stops_before_decoding(tmp_path: Path) -> None:
    from workers.whisper import TranscriptionCancelled

    missing = tmp_path / "gone.flac"  # decoding it would fail as AudioError, not as a cancellation
    with pytest.raises(TranscriptionCancelled):
        transcribe_ranges(missing, [(0.0, 5.0)], device="cpu", compute_type="int8", cancelled=lambda: True,
                          cache=ModelCache(cpu_threads=1))  # fmt: skip


@pytest.mark.parametrize("name", ["jfk.flac", "speech60.mp3"])
def test_a_rerun_range_is_decoded_alone_and_matches_the_whole_decode(name: str) -> None:
    import numpy as np
    from faster_whisper.audio import decode_audio

    from workers.whisper import _load_span

    path = JFK.parent / name
    whole = decode_audio(str(path), sampling_rate=16_000)
    clip, begins = _load_span(path, 16_000, 4.0, 9.5)
    assert 3.9 <= begins <= 4.0
    assert len(clip) == 5.5 * 16_000
    at = round(begins * 16_000)
    aligned = np.abs(whole[at : at + len(clip)] - clip).mean()
    assert aligned < 0.2 * np.abs(clip).mean()  # the same samples, but for the resampler's edges
    assert aligned < 0.5 * np.abs(whole[at + 800 : at + 800 + len(clip)] - clip).mean()  # 50 ms off is not
