"""What `rewrite_cues` asks the model to do with a chunk of numbered subtitle lines: fix them
(`fix_srt`) or translate them (`translate_srt`). The line protocol is the same for both, so one
chunk/verify/retry loop serves every such operation."""

from __future__ import annotations

from dataclasses import dataclass


def _answer_form(answer: str) -> str:
    """The line protocol, the same for every instruction (`from_lines` parses what it asks for)."""
    return (
        "The input is numbered lines of the form 'N: text'. Answer with exactly one line per input line, "
        f"with the same numbers in the same order, in the form 'N: {answer} text'. "
        "Keep every <br> marker: it stands for a line break inside one subtitle."
    )


DEFAULT_SYS_MSG = (
    "You correct subtitles produced by automatic speech recognition. "
    "Fix transcription errors (misheard words, wrong homophones, misspelled names), punctuation and casing. "
    "Do not translate, summarise, merge, split or reorder lines, and do not add commentary. "
) + _answer_form("corrected")
TRANSLATE_SYS_MSG = (
    "You translate subtitles into the language with the BCP 47 code '{language}'. "
    "Translate each line faithfully and naturally, as subtitles read; keep names, numbers and tone. "
    "Do not summarise, merge, split or reorder lines, and do not add commentary. "
) + _answer_form("translated")
"""`{language}` is replaced by the target language's code."""


@dataclass(frozen=True, slots=True)
class Instruction:
    """What the model is asked to do with each chunk's lines, and how progress, a kept chunk and a
    cancel are worded; made by `fixing()` or `translating()`."""

    system: str
    """The system message of every request."""
    doing: str
    """What a progress step and a cancel say is under way, e.g. "fixing"."""
    kept: str
    """What a warning says became of a chunk without a usable answer."""


def fixing(sys_msg: str | None = None) -> Instruction:
    """Correct the text in its own language (`fix_srt`); `sys_msg` replaces the default instructions."""
    return Instruction(system=sys_msg or DEFAULT_SYS_MSG, doing="fixing", kept="kept unchanged")


def translating(language: str, sys_msg: str | None = None) -> Instruction:
    """Translate into `language`, a BCP 47 code (`translate_srt`); `sys_msg` replaces the default
    instructions, `{language}` in it stands for the code, and without one the code is appended so
    that every language's requests still name their target."""
    template = sys_msg or TRANSLATE_SYS_MSG
    if "{language}" in template:
        system = template.replace("{language}", language)
    else:
        system = f"{template}\nTarget language (BCP 47 code): {language}"
    return Instruction(system=system, doing="translating", kept="kept in the source language")
