"""The `fix_srt` operation: an SRT's text corrected by an OpenAI-compatible chat model."""

from __future__ import annotations

from typing import Any

from streams import FixSrtParams, parse_params
from workers import subtitles
from workers._context import JobContext
from workers._instructions import fixing
from workers._llm_cues import read_cues, rewrite


async def fix_srt(ctx: JobContext) -> dict[str, Any]:
    """Chunks of cues to the model, at most MAX_LLM_CONCURRENCY requests in flight across all the
    worker's jobs; timestamps and count kept."""
    params = parse_params(ctx.params, FixSrtParams)
    source, cues = await read_cues(ctx)
    out, fixed = await rewrite(ctx, cues, fixing(params.sys_msg), params)
    text = subtitles.to_srt(out)
    subtitles.validate_srt(text)
    path = ctx.workdir / "fixed.srt"
    path.write_text(text, encoding="utf-8")
    output = await ctx.save_output(path, f"{source.stem}.fixed.srt", "application/x-subrip")
    return {
        "cues": len(out), "changed": fixed.changed, "chunks": fixed.chunks, "warnings": fixed.warnings,
        "retries": fixed.retries, "outputs": [output],
    }  # fmt: skip
