"""What the subtitle operations that call the LLM (`fix_srt`, `translate_srt`) share around
`llm.rewrite_cues`: reading the input's cues, and rewriting their text as one instruction says."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import msgspec

from streams import FixSrtParams
from workers import llm, subtitles
from workers._context import JobContext
from workers._errors import PermanentError, Retry
from workers._instructions import Instruction


async def read_cues(ctx: JobContext, *, vtt: bool = False) -> tuple[Path, list[subtitles.Cue]]:
    """The job's input file and its cues (SubRip, or WebVTT too when `vtt`); PermanentError unless
    it is valid and has at least one cue."""
    source = await ctx.input_file()
    text = source.read_text(encoding="utf-8-sig", errors="replace")
    kind = "SRT or VTT" if vtt else "SRT"
    try:
        cues = subtitles.read_subtitles(text) if vtt else subtitles.validate_srt(text)
    except subtitles.SubtitleError as exc:
        raise PermanentError(f"not a valid {kind} file: {exc}") from None
    if not cues:
        raise PermanentError(f"the {kind} file has no cues")
    return source, cues


async def rewrite(
    ctx: JobContext,
    cues: list[subtitles.Cue],
    instruction: Instruction,
    params: FixSrtParams,
    progress: Callable[[float, str], None] | None = None,
    runs: int = 1,
) -> tuple[list[subtitles.Cue], llm.FixResult]:
    """`cues` with their text rewritten by the model as `instruction` says (times and count kept),
    and how it went. A transient API failure is a Retry of the job, any other LLMError fails it.
    The job's ETA counts its chunks: those of `runs` rewrites of these cues (a language each)."""
    settings = ctx.settings
    ctx.work_units(math.ceil(len(cues) / max(1, params.chunk_size)) * runs)
    asked = [
        llm.Cue(index=c.index, start=str(c.start), end=str(c.end), text="\n".join(c.lines)) for c in cues
    ]
    try:
        done = await llm.rewrite_cues(
            asked, instruction, target=llm.endpoint(settings, params.base_url),
            model=params.model or settings.llm_model, chunk_size=params.chunk_size,
            max_concurrency=settings.llm_concurrency, slots=ctx.llm_slots,
            progress=progress or ctx.progress, cancelled=ctx.cancelled.is_set,
        )  # fmt: skip
    except llm.LLMError as exc:
        if exc.retryable:
            raise Retry(str(exc)) from None
        raise PermanentError(str(exc)) from None
    out = [
        msgspec.structs.replace(cue, lines=new.text.splitlines() or cue.lines)
        for cue, new in zip(cues, done.cues, strict=True)
    ]
    return out, done
