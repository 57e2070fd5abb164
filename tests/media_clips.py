"""Media clips the tests generate with PyAV (no binary fixtures in the repo)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def make_clip(
    path: Path, fmt: str, video_codec: str, audio_codec: str, seconds: float, size: tuple[int, int], fps: int
) -> Path:
    """A clip with a moving bar on a colour ramp and a mono 440 Hz tone."""
    width, height = size
    rate = 44100
    with av.open(str(path), "w", format=fmt) as out:
        video = out.add_stream(video_codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream(audio_codec, rate=rate)
        audio.layout = "mono"
        for i in range(round(seconds * fps)):
            shade = i * 5 % 256
            image = np.full((height, width, 3), (shade, 255 - shade, 128), dtype=np.uint8)
            image[:, i * 4 % width] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        for start in range(0, round(seconds * rate), 1024):
            tone = 8000 * np.sin(2 * np.pi * 440 * np.arange(start, start + 1024) / rate)
            sound = av.AudioFrame.from_ndarray(
                tone.astype(np.int16).reshape(1, -1), format="s16", layout="mono"
            )
            sound.sample_rate, sound.pts, sound.time_base = rate, start, Fraction(1, rate)
            out.mux(audio.encode(sound))
        out.mux(audio.encode(None))
    return path
