"""File kinds, as pipeline stages see them: what each operation takes and what it gives the next.

A file's kind is its suffix when it is one of the documents operations write (subtitles,
transcripts), else MEDIA: audio or video, which PyAV probes when the job runs.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from streams._operations import OperationSpec

MEDIA = "audio or video"
"""The kind of any file that is not a known document: operations on media read it with PyAV."""

DOCUMENT_SUFFIXES = frozenset({".srt", ".vtt", ".json", ".txt"})
"""The suffixes of the documents operations write; every other file is taken for MEDIA."""


def suffix_kind(suffix: str) -> str:
    """The kind of files ending in `suffix` (`.srt`, `.json`..., or MEDIA)."""
    suffix = suffix.lower()
    return suffix if suffix in DOCUMENT_SUFFIXES else MEDIA


def file_kind(name: str) -> str:
    """A file's kind by its name: `.srt`, `.json`..., or MEDIA."""
    return suffix_kind(PurePosixPath(name).suffix)


def kinds_text(kinds: tuple[str, ...]) -> str:
    """Kinds for a message: `.srt or .vtt`."""
    return " or ".join(kinds)


def stage_inputs(spec: OperationSpec) -> tuple[str, ...]:
    """The kinds an operation takes as a pipeline stage: its `input_kinds` as suffixes, or MEDIA."""
    return tuple(f".{kind}" for kind in spec.input_kinds) or (MEDIA,)
