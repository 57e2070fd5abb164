"""The blocking whisper core against the bundled tiny.en model and real media, on CPU."""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from workers.whisper import (
    AudioError,
    ModelCache,
    Transcript,
    TranscriptionCancelled,
    resolve_model,
    transcribe,
)

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
JFK = MEDIA / "jfk.flac"
SPEECH60 = MEDIA / "speech60.mp3"


def fast(path: Path, cache: ModelCache, **kwargs: Any) -> Transcript:
    """Transcribe on CPU int8 with greedy decoding, which keeps the file fast on a 2-core machine."""
    return transcribe(path, cache=cache, device="cpu", compute_type="int8", beam_size=1, **kwargs)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    """One cache for the module so tiny.en loads once."""
    return ModelCache(cpu_threads=2)


@pytest.mark.slow
def test_jfk_transcript(cache: ModelCache) -> None:
    result = fast(JFK, cache)
    assert "ask not what your country can do for you" in result.text.lower()
    assert result.language == "en"
    assert result.duration_s == pytest.approx(11.0, abs=0.1)
    assert len(result.segments) >= 1
    assert result.segments[0].start == pytest.approx(0.0, abs=0.5)
    assert result.segments[-1].end <= 11.1
    assert all(seg.words is None for seg in result.segments)


@pytest.mark.slow
def test_word_timestamps(cache: ModelCache) -> None:
    result = fast(JFK, cache, word_timestamps=True)
    words = [w for seg in result.segments for w in seg.words or []]
    assert len(words) >= 20
    assert [w.word.strip(" ,.").lower() for w in words[:3]] == ["and", "so", "my"]
    for prev, cur in itertools.pairwise(words):
        assert prev.start <= prev.end <= cur.start + 1e-6
    assert all(0.0 <= w.probability <= 1.0 for w in words)
    assert words[-1].end <= 11.1


@pytest.mark.slow
def test_progress_is_increasing(cache: ModelCache) -> None:
    calls: list[tuple[float, str]] = []
    result = fast(SPEECH60, cache, progress=lambda p, s: calls.append((p, s)))
    assert result.duration_s == pytest.approx(60.0, abs=0.5)
    *running, last = calls
    assert last == (100.0, "transcribed 01:00")
    percents = [p for p, _ in running]
    assert len(set(percents)) >= 4
    assert percents == sorted(percents)
    assert all(0.0 < p <= 99.9 for p in percents)
    for _, step in running:
        assert re.fullmatch(r"transcribing \d\d:\d\d / 01:00", step), step


def test_cancel_after_first_progress(cache: ModelCache) -> None:
    calls: list[float] = []
    started = time.monotonic()
    with pytest.raises(TranscriptionCancelled, match=r"cancelled at \d\d:\d\d / 01:00"):
        fast(SPEECH60, cache, progress=lambda p, _s: calls.append(p), cancelled=lambda: bool(calls))
    assert len(calls) == 1
    assert calls[0] < 50.0
    assert time.monotonic() - started < 10.0


def test_text_file_is_audio_error(cache: ModelCache, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not audio\n")
    with pytest.raises(AudioError, match=r"^could not read audio from notes\.txt: .*[Ii]nvalid data"):
        fast(notes, cache)


def test_empty_audio_is_audio_error(cache: ModelCache, tmp_path: Path) -> None:
    import wave

    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
    with pytest.raises(
        AudioError, match=r"^could not read audio from empty\.wav: the audio stream is empty$"
    ):
        fast(empty, cache)


def test_video_without_audio_is_audio_error(cache: ModelCache, tmp_path: Path) -> None:
    clip = tmp_path / "silent.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 64
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(
        AudioError, match=r"^could not read audio from silent\.mp4: the file has no audio stream$"
    ):
        fast(clip, cache)


def test_cache_loads_once() -> None:
    cache = ModelCache(cpu_threads=1)
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get("tiny.en", "cpu", "int8"))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 3
    assert got[0] is got[1] is got[2]
    assert cache.get("tiny.en", "cpu") is got[0]  # int8 is the CPU default compute type
    assert cache.loads == 1


def test_resolve_model(tmp_path: Path) -> None:
    bundled = Path(resolve_model("tiny.en"))
    assert bundled.is_dir()
    assert (bundled / "model.bin").is_file()
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("large-v3") == "large-v3"
