"""The `fix_srt` operation: an SRT's text corrected by an OpenAI-compatible chat model."""

from __future__ import annotations

from typing import Any

import msgspec

from streams import FixSrtParams, parse_params
from workers import llm, subtitles
from workers._context import JobContext
from workers._errors import PermanentError, Retry


async def fix_srt(ctx: JobContext) -> dict[str, Any]:
    """Chunks of cues to the model, at most MAX_LLM_CONCURRENCY requests in flight across all the
    worker's jobs; timestamps and count kept."""
    params = parse_params(ctx.params, FixSrtParams)
    settings = ctx.settings
    source = await ctx.input_file()
    try:
        cues = subtitles.validate_srt(source.read_text(encoding="utf-8-sig", errors="replace"))
    except subtitles.SubtitleError as exc:
        raise PermanentError(f"not a valid SRT file: {exc}") from None
    if not cues:
        raise PermanentError("the SRT file has no cues")
    asked = [
        llm.Cue(index=c.index, start=str(c.start), end=str(c.end), text="\n".join(c.lines)) for c in cues
    ]
    try:
        fixed = await llm.fix_cues(
            asked, target=llm.endpoint(settings, params.base_url),
            model=params.model or settings.llm_model, sys_msg=params.sys_msg, chunk_size=params.chunk_size,
            max_concurrency=settings.llm_concurrency, slots=ctx.llm_slots,
            progress=ctx.progress, cancelled=ctx.cancelled.is_set,
        )  # fmt: skip
    except llm.LLMError as exc:
        if exc.retryable:
            raise Retry(str(exc)) from None
        raise PermanentError(str(exc)) from None
    out = [
        msgspec.structs.replace(cue, lines=new.text.splitlines() or cue.lines)
        for cue, new in zip(cues, fixed.cues, strict=True)
    ]
    text = subtitles.to_srt(out)
    subtitles.validate_srt(text)
    path = ctx.workdir / "fixed.srt"
    path.write_text(text, encoding="utf-8")
    output = await ctx.save_output(path, f"{source.stem}.fixed.srt", "application/x-subrip")
    return {
        "cues": len(out), "changed": fixed.changed, "chunks": fixed.chunks, "warnings": fixed.warnings,
        "retries": fixed.retries, "outputs": [output],
    }  # fmt: skip
