"""The `translate_srt` operation: an SRT or VTT file translated by an OpenAI-compatible chat model,
once per target language, with `fix_srt`'s chunks, verifier and retries (`llm.rewrite_cues`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streams import TranslateSrtParams, parse_params
from workers import subtitles
from workers._context import JobContext
from workers._instructions import translating
from workers._llm_cues import read_cues, rewrite

MAX_WARNINGS = 10
"""Warnings listed per language; the rest are counted. Twenty languages of a film whose chunks the
model keeps breaking would otherwise make a result over the bound of a message (MAX_RESULT_BYTES),
failing the job after all its work; `kept` still counts every cue."""


def _listed(warnings: list[str]) -> list[str]:
    """The first MAX_WARNINGS warnings, and a line that counts the others."""
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    return [*warnings[:MAX_WARNINGS], f"and {len(warnings) - MAX_WARNINGS} more chunks like these"]


def _share(ctx: JobContext, position: int, languages: list[str]) -> Callable[[float, str], None]:
    """Progress of one language's chunks as its share of the whole job (languages run in turn)."""
    language, count = languages[position], len(languages)

    def progress(percent: float, step: str) -> None:
        ctx.progress((100.0 * position + percent) / count, f"{language} ({position + 1} of {count}): {step}")

    return progress


async def translate_srt(ctx: JobContext) -> dict[str, Any]:
    """Each language in turn: the cues' text to the model in chunks (at most MAX_LLM_CONCURRENCY
    requests in flight across the worker's jobs), cue count and timestamps kept; a chunk whose
    answers keep breaking them stays in the source language, with a warning."""
    params = parse_params(ctx.params, TranslateSrtParams)
    source, cues = await read_cues(ctx, vtt=True)
    stem = source.stem
    outputs: list[dict[str, Any]] = []
    languages: dict[str, dict[str, Any]] = {}
    chunks = retries = 0
    for position, language in enumerate(params.languages):
        ctx.check_cancelled()
        progress = _share(ctx, position, params.languages)
        out, done = await rewrite(
            ctx, cues, translating(language, params.sys_msg), params, progress, runs=len(params.languages)
        )
        srt, vtt = subtitles.to_srt(out), subtitles.to_vtt(out)
        subtitles.validate_srt(srt)
        subtitles.validate_vtt(vtt)
        srt_path, vtt_path = ctx.workdir / f"{language}.srt", ctx.workdir / f"{language}.vtt"
        srt_path.write_text(srt, encoding="utf-8")
        vtt_path.write_text(vtt, encoding="utf-8")
        outputs += [
            await ctx.save_output(srt_path, f"{stem}.{language}.srt", "application/x-subrip"),
            await ctx.save_output(vtt_path, f"{stem}.{language}.vtt", "text/vtt"),
        ]
        languages[language] = {
            "translated": len(out) - done.kept, "kept": done.kept, "warnings": _listed(done.warnings),
            "retries": done.retries,
        }  # fmt: skip
        chunks, retries = done.chunks, retries + done.retries
    return {
        "cues": len(cues),
        "chunks": chunks,
        "retries": retries,
        "languages": languages,
        "outputs": outputs,
    }
