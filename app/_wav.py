"""Raw 16 kHz mono s16le PCM (whisper-asr-webservice's `encode=false` body) read as a WAV file.

The PCM stays where the multipart parser spooled it: a reader puts the 44-byte header in front
of it, so a body of any size is stored as a WAV (which PyAV decodes) without being copied.
"""

from __future__ import annotations

import io
import os
import struct
from typing import IO

from streams import CHUNK

PCM_RATE = 16_000
"""Samples per second of the raw PCM whisper-asr-webservice takes (whisper's own rate)."""
PCM_SAMPLE_BYTES = 2
"""One mono s16le sample."""
HEADER_BYTES = 44
MAX_DATA_BYTES = 0xFFFF_FFFF - (HEADER_BYTES - 8)
"""A WAV counts its bytes in 32 bits: about 37 hours of this PCM."""


class PcmTooLargeError(ValueError):
    """The PCM does not fit in one WAV file."""


def wav_header(data_bytes: int) -> bytes:
    """The RIFF/WAVE header of `data_bytes` of 16 kHz mono 16-bit PCM."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", HEADER_BYTES - 8 + data_bytes, b"WAVE",
        b"fmt ", 16, 1, 1, PCM_RATE, PCM_RATE * PCM_SAMPLE_BYTES, PCM_SAMPLE_BYTES, 8 * PCM_SAMPLE_BYTES,
        b"data", data_bytes,
    )  # fmt: skip


class _PcmAsWav(io.RawIOBase):
    """The header, then the PCM's first `data_bytes` (read from the start of `pcm`)."""

    def __init__(self, pcm: IO[bytes], data_bytes: int) -> None:
        super().__init__()
        self._pcm = pcm
        self._header = wav_header(data_bytes)
        self._size = HEADER_BYTES + data_bytes
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._size - self._position)
        if wanted <= 0:
            return 0
        if self._position < HEADER_BYTES:
            piece = self._header[self._position : self._position + wanted]
        else:
            self._pcm.seek(self._position - HEADER_BYTES)
            piece = self._pcm.read(wanted)
        view[: len(piece)] = piece
        self._position += len(piece)
        return len(piece)


def pcm_as_wav(pcm: IO[bytes], max_seconds: float | None = None) -> IO[bytes]:
    """A seekable WAV file made of the raw PCM in `pcm` (whole samples only; its first
    `max_seconds` when given); raises PcmTooLargeError past what a WAV can hold."""
    size = pcm.seek(0, os.SEEK_END)
    data_bytes = size - size % PCM_SAMPLE_BYTES
    if max_seconds is not None:
        data_bytes = min(data_bytes, int(max_seconds * PCM_RATE) * PCM_SAMPLE_BYTES)
    if data_bytes > MAX_DATA_BYTES:
        raise PcmTooLargeError(
            f"{size} bytes of raw PCM do not fit in a WAV file (at most {MAX_DATA_BYTES}); send the audio"
            " encoded (encode=true)"
        )
    return io.BufferedReader(_PcmAsWav(pcm, data_bytes), buffer_size=CHUNK)
