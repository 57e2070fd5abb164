"""P5: the convert core, remux path vs transcode path, and transcode vs the ffmpeg CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, apt_install, median, scaled, table, write_json

SECONDS = scaled(30, 10)
SIZE, FPS = (640, 360), 25
ROUNDS = scaled(3, 2)
TARGET_REMUX_SPEEDUP, TARGET_FFMPEG_RATIO = 50.0, 1.1


def _clips(folder: Path) -> tuple[Path, Path]:
    """The same picture and tone twice: H.264 + AAC in Matroska (MP4 takes the packets as they
    are: remux) and MPEG-4 Part 2 + MP2 in AVI (MP4 wants other codecs: transcode)."""
    sys.path.insert(0, str(REPO))
    from tests.media_clips import make_clip

    remux = make_clip(folder / "h264.mkv", "matroska", "libx264", "aac", SECONDS, SIZE, FPS)
    transcode = make_clip(folder / "mpeg4.avi", "avi", "mpeg4", "mp2", SECONDS, SIZE, FPS)
    return remux, transcode


def _jobcast(src: Path, dst: Path) -> tuple[float, str]:
    from workers.media import convert_to_mp4

    began = time.perf_counter()
    done = convert_to_mp4(
        src, dst
    )  # the convert operation's defaults: libx264 CRF 23, AAC 64 kb/s per channel
    return time.perf_counter() - began, done.path


def _ffmpeg(ffmpeg: str, src: Path, dst: Path) -> float:
    """What convert_to_mp4's transcode path does, as one ffmpeg command."""
    argv = [ffmpeg, "-nostdin", "-y", "-loglevel", "error", "-i", str(src), "-c:v", "libx264", "-crf", "23",
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-ac", "1", "-movflags", "+faststart", str(dst)]  # fmt: skip
    began = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - began


def _version(ffmpeg: str) -> str:
    return subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split("\n")[0]


async def run() -> dict[str, Any]:
    """Rounds of remux, transcode and ffmpeg, alternating."""
    ffmpeg = apt_install("ffmpeg", "ffmpeg")
    version = _version(ffmpeg)
    times: dict[str, list[float]] = {"remux": [], "transcode": [], "ffmpeg": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        remux_src, transcode_src = await asyncio.to_thread(_clips, folder)
        for _ in range(ROUNDS):
            seconds, path = await asyncio.to_thread(_jobcast, remux_src, folder / "remuxed.mp4")
            assert path == "remux", path
            times["remux"].append(seconds)
            seconds, path = await asyncio.to_thread(_jobcast, transcode_src, folder / "transcoded.mp4")
            assert path == "transcode", path
            times["transcode"].append(seconds)
            times["ffmpeg"].append(
                await asyncio.to_thread(_ffmpeg, ffmpeg, transcode_src, folder / "ffmpeg.mp4")
            )
    remux, transcode, cli = (median(times[k]) for k in ("remux", "transcode", "ffmpeg"))
    speedup, ratio = transcode / remux, transcode / cli
    rows = [
        ["ffmpeg CLI transcode (baseline)", cli, "1.00x", "", ""],
        ["jobcast transcode", transcode, f"{ratio:.2f}x ffmpeg", f"<= {TARGET_FFMPEG_RATIO}x ffmpeg",
         "met" if ratio <= TARGET_FFMPEG_RATIO else "not met"],
        ["jobcast remux", remux, f"{speedup:.0f}x faster than transcode", f">= {TARGET_REMUX_SPEEDUP:.0f}x",
         "met" if speedup >= TARGET_REMUX_SPEEDUP else "not met"],
    ]  # fmt: skip
    table(
        f"P5 convert: {SECONDS} s of {SIZE[0]}x{SIZE[1]} @ {FPS} fps + mono audio (median of {ROUNDS}, seconds)",
        ["", "seconds", "ratio", "target", "result"],
        rows,
    )
    result = {
        "clip": {"seconds": SECONDS, "size": SIZE, "fps": FPS},
        "ffmpeg": version,
        "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "remux_speedup": round(speedup, 1),
        "transcode_vs_ffmpeg": round(ratio, 3),
        "met": {"remux": speedup >= TARGET_REMUX_SPEEDUP, "transcode": ratio <= TARGET_FFMPEG_RATIO},
    }
    write_json("convert", result)
    return result


if __name__ == "__main__":
    asyncio.run(run())
