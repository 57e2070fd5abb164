"""The media conversion core on small clips generated with PyAV, plus one real MP3."""

from __future__ import annotations

import time
from pathlib import Path

import av
import pytest

from tests.media_clips import make_clip as make_media_clip
from workers import media
from workers.media import ConversionCancelled, MediaError, convert_to_mp4, probe

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "media" / "speech60.mp3"
SECONDS, FPS, RATE, WIDTH, HEIGHT = 2.0, 25, 44100, 160, 120


def make_clip(path: Path, fmt: str, video_codec: str, audio_codec: str) -> Path:
    """A SECONDS-long clip at WIDTHxHEIGHT with a mono 440 Hz tone."""
    return make_media_clip(path, fmt, video_codec, audio_codec, SECONDS, (WIDTH, HEIGHT), FPS)


@pytest.fixture(scope="module")
def mkv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("src") / "h264_aac.mkv", "matroska", "libx264", "aac")


@pytest.fixture(scope="module")
def avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("src") / "mpeg4_mp3.avi", "avi", "mpeg4", "libmp3lame")


def streams_of(path: Path) -> list[tuple[str, str, int | None, int | None]]:
    """(kind, codec, width, height) of every stream, as PyAV reads the file back."""
    info = probe(path)
    return [(s.kind, s.codec, s.width, s.height) for s in info.streams]


def test_sources_probe_as_generated(mkv: Path, avi: Path) -> None:
    mkv_info, avi_info = probe(mkv), probe(avi)
    assert mkv_info.container == "matroska,webm"
    assert avi_info.container == "avi"
    assert [(s.kind, s.codec) for s in mkv_info.streams] == [("video", "h264"), ("audio", "aac")]
    assert [(s.kind, s.codec) for s in avi_info.streams] == [("video", "mpeg4"), ("audio", "mp3")]
    assert (mkv_info.streams[0].width, mkv_info.streams[0].height) == (WIDTH, HEIGHT)
    assert (mkv_info.streams[1].sample_rate, mkv_info.streams[1].channels) == (RATE, 1)
    assert mkv_info.duration_s == pytest.approx(SECONDS, abs=0.1)


def test_h264_aac_mkv_is_remuxed(mkv: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.mp4"
    result = convert_to_mp4(mkv, dst)
    assert result.path == "remux"
    assert (result.container, result.video_codec, result.audio_codec) == ("mp4", "h264", "aac")
    assert result.size == dst.stat().st_size > 10_000
    assert result.duration_s == pytest.approx(probe(mkv).duration_s, abs=0.1)
    with av.open(str(dst)) as out:
        assert "mp4" in out.format.name
        assert [s.codec_context.name for s in out.streams] == ["h264", "aac"]
        assert out.duration / av.time_base == pytest.approx(probe(mkv).duration_s, abs=0.1)
    assert streams_of(dst) == [("video", "h264", WIDTH, HEIGHT), ("audio", "aac", None, None)]


def test_mpeg4_mp3_avi_is_transcoded(avi: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.mp4"
    result = convert_to_mp4(avi, dst)
    assert result.path == "transcode"
    assert (result.video_codec, result.audio_codec) == ("h264", "aac")
    assert result.duration_s == pytest.approx(probe(avi).duration_s, abs=0.1)
    assert streams_of(dst) == [("video", "h264", WIDTH, HEIGHT), ("audio", "aac", None, None)]
    with av.open(str(dst)) as out:
        assert out.streams.video[0].codec_context.pix_fmt == "yuv420p"
        assert out.streams.video[0].frames == SECONDS * FPS


def test_max_height_scales_keeping_aspect(mkv: Path, tmp_path: Path) -> None:
    dst = tmp_path / "small.mp4"
    result = convert_to_mp4(mkv, dst, max_height=90)
    # Scaling needs decoding even though H.264 could have been copied.
    assert result.path == "transcode"
    # 160x120 at height 90 is 120x90; odd results round to even for yuv420p.
    assert streams_of(dst)[0] == ("video", "h264", 120, 90)
    convert_to_mp4(mkv, tmp_path / "odd.mp4", max_height=75)
    _kind, _codec, width, height = streams_of(tmp_path / "odd.mp4")[0]
    assert (width, height) == (100, 74)
    assert width % 2 == 0


def test_audio_only_gives_aac_m4a(mkv: Path, avi: Path, tmp_path: Path) -> None:
    copied = convert_to_mp4(mkv, tmp_path / "copied.m4a", audio_only=True)
    encoded = convert_to_mp4(avi, tmp_path / "encoded.m4a", audio_only=True)
    assert (copied.path, encoded.path) == ("remux", "transcode")
    for result, name in ((copied, "copied.m4a"), (encoded, "encoded.m4a")):
        assert (result.container, result.video_codec, result.audio_codec) == ("m4a", None, "aac")
        assert result.duration_s == pytest.approx(SECONDS, abs=0.1)
        with av.open(str(tmp_path / name)) as out:
            assert "m4a" in out.format.name
            assert [(s.type, s.codec_context.name) for s in out.streams] == [("audio", "aac")]


def test_progress_rises_to_100(avi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "PROGRESS_INTERVAL", 0.0)  # report every packet, not every 0.25 s
    calls: list[tuple[float, str]] = []
    convert_to_mp4(avi, tmp_path / "out.mp4", progress=lambda pct, step: calls.append((pct, step)))
    percents = [pct for pct, _ in calls]
    assert len(percents) > 10
    assert percents == sorted(percents)
    assert percents[0] < 10
    assert percents[-1] == 100.0
    assert calls[-1][1] == "transcoding 00:02 / 00:02"
    assert calls[0][1] == "transcoding 00:00 / 00:02"


def test_progress_is_throttled(avi: Path, tmp_path: Path) -> None:
    calls: list[float] = []
    started = time.monotonic()
    convert_to_mp4(avi, tmp_path / "out.mp4", progress=lambda pct, step: calls.append(pct))
    elapsed = time.monotonic() - started
    # One report per 0.25 s at most, plus the final one (a 2 s clip converts in a few tens of ms).
    assert len(calls) <= 2 + elapsed / 0.25
    assert (calls[0], calls[-1]) == (0.0, 100.0)


def test_cancel_stops_and_leaves_no_output(avi: Path, tmp_path: Path) -> None:
    calls: list[float] = []
    dst = tmp_path / "out.mp4"
    with pytest.raises(ConversionCancelled):
        convert_to_mp4(avi, dst, progress=lambda pct, step: calls.append(pct), cancelled=lambda: bool(calls))
    assert calls == [0.0]
    assert list(tmp_path.iterdir()) == []


def test_text_file_is_not_media(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("meeting notes\n" * 50)
    with pytest.raises(MediaError, match=r"^not a media file: notes\.txt looks like text$"):
        probe(text)
    with pytest.raises(MediaError, match="not a media file"):
        convert_to_mp4(text, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_garbage_bytes_are_not_media(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MediaError, match=r"^not a media file: junk\.bin"):
        probe(junk)


def test_truncated_mkv_is_rejected(mkv: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[:2048])
    with pytest.raises(
        MediaError, match=r"^not a media file: cut\.mkv is truncated \(data ends at 0\.\ds of 2\.0s\)$"
    ):
        probe(cut)
    with pytest.raises(MediaError, match="truncated"):
        convert_to_mp4(cut, tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mkv"]


def test_real_speech_mp3() -> None:
    info = probe(SPEECH)
    assert info.container == "mp3"
    assert info.duration_s == pytest.approx(60.0, abs=0.5)
    assert [(s.kind, s.codec, s.sample_rate, s.channels) for s in info.streams] == [
        ("audio", "mp3", 24000, 1)
    ]


def test_real_speech_mp3_to_m4a(tmp_path: Path) -> None:
    result = convert_to_mp4(SPEECH, tmp_path / "speech.m4a", audio_only=True)
    assert (result.path, result.audio_codec, result.video_codec) == ("transcode", "aac", None)
    assert result.duration_s == pytest.approx(probe(SPEECH).duration_s, abs=0.1)
