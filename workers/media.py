"""Media conversion core: probe a file, then remux or transcode it into MP4 (or M4A).

Everything here blocks and is CPU-bound; the `convert` operation runs it in a thread and passes
`progress`/`cancelled` callbacks that are safe to call from there.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import msgspec
from av.audio.stream import AudioStream
from av.container import InputContainer, OutputContainer
from av.stream import Disposition
from av.video.frame import PictureType
from av.video.stream import VideoStream

# What MP4 carries as it is: packets in these codecs are copied without decoding.
MP4_VIDEO = frozenset({"h264", "hevc"})
MP4_AUDIO = frozenset({"aac", "mp3"})
PROGRESS_INTERVAL = 0.25

Progress = Callable[[float, str], None]
Cancelled = Callable[[], bool]


class MediaError(ValueError):
    """The input is not usable media (not media, truncated, no streams), or converting it failed."""


class ConversionCancelled(Exception):  # noqa: N818 - the name the convert operation uses
    """Raised between packets once `cancelled()` returns true."""


class StreamInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One audio or video stream of a media file."""

    kind: Literal["video", "audio"]
    codec: str
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None
    channels: int | None = None


class MediaInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `probe` found: duration, container format and audio/video streams."""

    duration_s: float
    container: str
    streams: list[StreamInfo]


class ConvertResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `convert_to_mp4` produced, and whether it copied packets or re-encoded them."""

    path: Literal["remux", "transcode"]
    duration_s: float
    container: str
    video_codec: str | None
    audio_codec: str | None
    size: int


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Describe a media file; raise MediaError when it is not one."""
    path = Path(path)
    with _open(path) as container:
        videos, audios = _streams(container, path)
        duration = _duration(container)
        _check_complete(container, path, duration)
        streams = [_describe(v) for v in videos] + [_describe(a) for a in audios]
        return MediaInfo(duration_s=duration, container=container.format.name, streams=streams)


def convert_to_mp4(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    video_codec: str = "libx264",
    crf: int = 23,
    bitrate: int | None = None,
    max_height: int | None = None,
    audio_only: bool = False,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> ConvertResult:
    """Convert `src` into an MP4 (an M4A when `audio_only`) at `dst`, copying packets when possible."""
    src, dst = Path(src), Path(dst)
    probe(src)  # fail early, with the clear message, on non-media and truncated input
    part = dst.with_name(f".{dst.name}.part")  # readers of `dst` never see a half-written file
    try:
        with _open(src) as inp:
            videos, audios = _streams(inp, src)
            video = None if audio_only else next(iter(videos), None)
            audio = next(iter(audios), None)
            if audio_only and audio is None:
                raise MediaError(f"{src.name} has no audio stream to extract")
            copyable_audio = {"aac"} if audio_only else MP4_AUDIO
            remux = (
                video is None
                or (_codec(video) in MP4_VIDEO and (max_height is None or video.height <= max_height))
            ) and (audio is None or _codec(audio) in copyable_audio)
            tracker = _Tracker(progress, cancelled, _duration(inp), "remuxing" if remux else "transcoding")
            # "ipod" is FFmpeg's M4A flavour of MP4; faststart lets players begin before the download ends.
            fmt = "ipod" if audio_only else "mp4"
            with av.open(str(part), "w", format=fmt, container_options={"movflags": "+faststart"}) as out:
                if remux:
                    _remux(inp, out, [s for s in (video, audio) if s is not None], tracker)
                else:
                    _transcode(inp, out, video, audio, tracker, video_codec, crf, bitrate, max_height)
        tracker.finish()
        info = probe(part)
        os.replace(part, dst)
    except av.FFmpegError as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, permissions: the environment's fault, not the input's
            raise
        raise MediaError(f"conversion of {src.name} failed: {exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    kinds = {s.kind: s.codec for s in info.streams}
    return ConvertResult(
        path="remux" if remux else "transcode",
        duration_s=info.duration_s,
        container="m4a" if audio_only else "mp4",
        video_codec=kinds.get("video"),
        audio_codec=kinds.get("audio"),
        size=dst.stat().st_size,
    )


class _Tracker:
    """Checks for cancellation on every packet and reports progress at most every PROGRESS_INTERVAL."""

    def __init__(self, progress: Progress | None, cancelled: Cancelled | None, total: float, verb: str):
        self._progress, self._cancelled, self._total, self._verb = progress, cancelled, total, verb
        self._last_report = -PROGRESS_INTERVAL
        self._position = 0.0

    def tick(self, seconds: float | None) -> None:
        if self._cancelled is not None and self._cancelled():
            raise ConversionCancelled("conversion cancelled")
        # Audio and video interleave, B-frames reorder: keep the furthest point so percent never drops.
        if seconds is not None and self._total > 0:
            self._position = max(self._position, min(seconds, self._total))
        now = time.monotonic()
        if self._progress is not None and now - self._last_report >= PROGRESS_INTERVAL:
            self._last_report = now
            self._report()

    def finish(self) -> None:
        self._position = self._total
        self._report(done=True)

    def _report(self, done: bool = False) -> None:
        if self._progress is None:
            return
        percent = 100.0 if done else 100.0 * self._position / self._total if self._total > 0 else 0.0
        step = f"{self._verb} {_clock(self._position)} / {_clock(self._total)}"
        self._progress(round(percent, 1), step)


def _open(path: Path) -> InputContainer:
    try:
        return av.open(str(path), "r")
    except FileNotFoundError:
        raise
    except av.FFmpegError as exc:
        raise MediaError(f"not a media file: {path.name} ({exc})") from exc


def _streams(container: InputContainer, path: Path) -> tuple[list[VideoStream], list[AudioStream]]:
    # Cover art in MP3/M4A shows up as a one-frame video stream; it is not video.
    videos = [s for s in container.streams.video if s.width and not s.disposition & Disposition.attached_pic]
    audios = [s for s in container.streams.audio if s.sample_rate]
    # FFmpeg also "demuxes" text (as ANSI art, format "tty") and still images; neither is media to convert.
    name = container.format.name
    if name == "tty" or name.startswith("image2") or name.endswith("_pipe"):
        raise MediaError(
            f"not a media file: {path.name} looks like {'text' if name == 'tty' else 'an image'}"
        )
    if not videos and not audios:
        raise MediaError(f"not a media file: {path.name} has no audio or video stream")
    return videos, audios


def _check_complete(container: InputContainer, path: Path, duration: float) -> None:
    # A cut-off file still has a header promising the full length: look for packets near its end.
    start = (container.start_time or 0) / av.time_base
    with contextlib.suppress(av.FFmpegError):  # nothing to seek with: scan from the start instead
        container.seek(int((start + max(0.0, duration - 5.0)) * av.time_base))
    seen, end = False, 0.0
    try:
        for packet in container.demux():
            seen = seen or bool(packet.size)
            stamp = packet.pts if packet.pts is not None else packet.dts
            if packet.size and stamp is not None and packet.time_base:
                end = max(end, float((stamp + (packet.duration or 0)) * packet.time_base) - start)
    except av.FFmpegError as exc:
        raise MediaError(f"not a media file: {path.name} is damaged ({exc})") from exc
    if not seen:
        raise MediaError(f"not a media file: {path.name} holds no media data (truncated?)")
    # Header durations can be estimates (VBR MP3 without an index), so only a clear shortfall counts.
    if duration > 0 and end < duration * 0.9 - 1.0:
        raise MediaError(
            f"not a media file: {path.name} is truncated (data ends at {end:.1f}s of {duration:.1f}s)"
        )


def _describe(s: VideoStream | AudioStream) -> StreamInfo:
    if isinstance(s, VideoStream):
        return StreamInfo(kind="video", codec=_codec(s), width=s.width, height=s.height)
    return StreamInfo(kind="audio", codec=_codec(s), sample_rate=s.sample_rate, channels=s.channels)


def _codec(stream: VideoStream | AudioStream) -> str:
    # The decoder's name can differ ("mp3float"); the canonical name is the format's ("mp3").
    return stream.codec_context.codec.canonical_name


def _duration(container: InputContainer) -> float:
    if container.duration:
        return container.duration / av.time_base
    lengths = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
    return max(lengths, default=0.0)


def _target_size(width: int, height: int, max_height: int | None) -> tuple[int, int]:
    scaled_w, scaled_h = float(width), float(height)
    if max_height is not None and height > max_height:
        scaled_w, scaled_h = width * max_height / height, float(max_height)
    # yuv420p halves chroma both ways, so x264 needs even dimensions.
    return max(2, round(scaled_w / 2) * 2), max(2, int(scaled_h) // 2 * 2)


def _start_offsets(inp: InputContainer, streams: list[VideoStream | AudioStream]) -> dict[int, int]:
    # Sources such as MPEG-TS start at an arbitrary clock value; shift every stream by the same
    # amount so the output starts at zero and stays in sync.
    start = Fraction(inp.start_time or 0, av.time_base)
    return {s.index: int(start / s.time_base) if s.time_base else 0 for s in streams}


def _seconds(pts: int | None, stream: av.stream.Stream, offset: int) -> float | None:
    return None if pts is None or stream.time_base is None else float((pts - offset) * stream.time_base)


def _remux(
    inp: InputContainer, out: OutputContainer, streams: list[VideoStream | AudioStream], tracker: _Tracker
) -> None:
    targets = {s.index: out.add_stream_from_template(s) for s in streams}
    for source in streams:
        # Apple players only play HEVC in MP4 under the "hvc1" tag; FFmpeg's default is "hev1".
        if _codec(source) == "hevc":
            targets[source.index].codec_context.codec_tag = "hvc1"
    offsets = _start_offsets(inp, streams)
    last_dts: dict[int, int] = {}
    for packet in inp.demux(*streams):
        # The demuxer's end-of-stream packets (and any undated ones) have nowhere to go in MP4.
        if packet.dts is None or not packet.size:
            continue
        index = packet.stream.index
        tracker.tick(_seconds(packet.pts, packet.stream, offsets[index]))
        packet.dts -= offsets[index]
        if packet.pts is not None:
            packet.pts -= offsets[index]
        # The MP4 muxer rejects non-increasing DTS; nudging keeps slightly broken files convertible.
        previous = last_dts.get(index)
        if previous is not None and packet.dts <= previous:
            packet.dts = previous + 1
            if packet.pts is not None and packet.pts < packet.dts:
                packet.pts = packet.dts
        last_dts[index] = packet.dts
        packet.stream = targets[index]
        out.mux(packet)


def _transcode(
    inp: InputContainer,
    out: OutputContainer,
    video: VideoStream | None,
    audio: AudioStream | None,
    tracker: _Tracker,
    video_codec: str,
    crf: int,
    bitrate: int | None,
    max_height: int | None,
) -> None:
    streams: list[VideoStream | AudioStream] = [s for s in (video, audio) if s is not None]
    offsets = _start_offsets(inp, streams)
    vout: VideoStream | None = None
    aout: AudioStream | None = None
    if video is not None:
        video.codec_context.thread_type = "AUTO"
        width, height = _target_size(video.width, video.height, max_height)
        added = out.add_stream(video_codec, rate=video.average_rate or video.guessed_rate or Fraction(25))
        if not isinstance(added, VideoStream):
            raise MediaError(f"{video_codec} is not a video encoder")
        vout = added
        vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
        # PyAV's default (slice threads) makes x264 split each frame: slower and larger than the
        # frame threading the ffmpeg CLI gets.
        vout.codec_context.thread_type = "FRAME"
        # Keep the source's clock so variable frame rate input keeps its timing.
        if video.time_base:
            vout.codec_context.time_base = video.time_base
        if bitrate is not None:
            vout.bit_rate = bitrate
        else:
            vout.options = {"crf": str(crf)}
    if audio is not None:
        audio.codec_context.thread_type = "AUTO"
        aout = out.add_stream("aac", rate=audio.sample_rate)
        # Stereo AAC plays everywhere; exotic multichannel layouts are what players choke on.
        aout.layout = "mono" if audio.channels == 1 else "stereo"
        # FFmpeg's 128 kb/s default regardless of channels wastes space on mono speech.
        aout.bit_rate = 64_000 * aout.channels
    last_pts, next_sample = -1, 0
    for packet in inp.demux(*streams):
        index = packet.stream.index
        tracker.tick(_seconds(packet.pts, packet.stream, offsets[index]))
        for frame in packet.decode():
            if isinstance(frame, av.VideoFrame) and vout is not None:
                pts = frame.pts - offsets[index] if frame.pts is not None else last_pts + 1
                frame = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
                # The decoder's I/P/B choice is no order for x264, which picks its own.
                frame.pict_type = PictureType.NONE
                frame.pts, last_pts = max(pts, last_pts + 1), max(pts, last_pts + 1)
                out.mux(vout.encode(frame))
            elif isinstance(frame, av.AudioFrame) and aout is not None:
                # Count in samples: the source's audio clock (AVI: one tick per MP3 frame) is not the
                # 1/sample_rate one the encoder's resampler and the AAC encoder assume.
                rate = frame.sample_rate
                if frame.pts is not None and frame.time_base is not None:
                    next_sample = max(
                        next_sample, round((frame.pts - offsets[index]) * frame.time_base * rate)
                    )
                frame.pts, frame.time_base = next_sample, Fraction(1, rate)
                next_sample += frame.samples
                out.mux(aout.encode(frame))
    if vout is not None:
        out.mux(vout.encode(None))
    if aout is not None:
        out.mux(aout.encode(None))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
