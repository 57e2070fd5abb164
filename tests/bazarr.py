"""Bazarr's Whisper provider as a test client: its HTTP calls to whisper-asr-webservice's API as it
makes them, and the raw PCM it makes of a video's audio."""

from __future__ import annotations

from pathlib import Path

import av
import requests


def pcm_s16le_16k(path: Path) -> bytes:
    """What Bazarr makes of a video's audio with ffmpeg: raw 16 kHz mono s16le PCM."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16_000)
    pcm = bytearray()
    with av.open(str(path)) as container:
        for frame in [*container.decode(audio=0), None]:
            for resampled in resampler.resample(frame):
                pcm += resampled.to_ndarray().tobytes()
    return bytes(pcm)


class Bazarr:
    """Bazarr's Whisper provider, its HTTP calls as it makes them (requests, its parameters, its
    headers and timeouts: custom_libs/subliminal_patch/providers/whisperai.py)."""

    def __init__(self, endpoint: str, pass_video_name: bool = False) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.pass_video_name = pass_video_name
        self.response, self.timeout = 5, 120  # its connection and transcription timeouts
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "Subliminal/2.1.0"

    def detect_language(self, out: bytes, path: str) -> requests.Response:
        video_name = path if self.pass_video_name else None
        return self.session.post(
            f"{self.endpoint}/detect-language",
            params={"encode": "false", "video_file": {video_name}},  # a set: requests drops {None}
            files={"audio_file": out},
            timeout=(self.response, self.timeout),
        )

    def download_subtitle(self, out: bytes, path: str, task: str, language: str) -> requests.Response:
        video_name = path if self.pass_video_name else None
        return self.session.post(
            f"{self.endpoint}/asr",
            params={
                "task": task,
                "language": language,
                "output": "srt",
                "encode": "false",
                "video_file": {video_name},
            },
            files={"audio_file": out},
            timeout=(self.response, self.timeout),
        )


__all__ = ["Bazarr", "pcm_s16le_16k"]
