"""The `transcribe` and `generate_srt` operations: faster-whisper on the job's input file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from streams import GenerateSrtParams, TranscribeParams, parse_params
from workers import subtitles
from workers._context import JobContext
from workers._errors import JobCancelledError, PermanentError
from workers.media import MediaError, probe
from workers.whisper import AudioError, Transcript, TranscriptionCancelled
from workers.whisper import transcribe as run_whisper


async def _transcript(ctx: JobContext, params: TranscribeParams) -> tuple[Path, Transcript]:
    source = await ctx.input_file()
    try:
        await ctx.run_blocking(probe, source)  # "not a media file: … looks like text" beats a decoder error
    except MediaError as exc:
        raise PermanentError(str(exc)) from None
    ctx.progress(0.0, "loading model")
    try:
        transcript = await ctx.run_blocking(
            run_whisper, source, model=params.model, language=params.language, task=params.task,
            beam_size=params.beam_size, vad_filter=params.vad_filter, word_timestamps=params.word_timestamps,
            initial_prompt=params.initial_prompt, device=params.device, compute_type=params.compute_type,
            progress=ctx.progress, cancelled=ctx.cancelled.is_set,
        )  # fmt: skip
    except AudioError as exc:
        raise PermanentError(str(exc)) from None
    except TranscriptionCancelled as exc:
        raise JobCancelledError(str(exc)) from None
    return source, transcript


async def transcribe(ctx: JobContext) -> dict[str, Any]:
    """Speech to text: text, language, duration and segments, stored as .json and .txt files."""
    params = parse_params(ctx.params, TranscribeParams)
    source, transcript = await _transcript(ctx, params)
    stem = source.stem
    json_path, txt_path = ctx.workdir / "transcript.json", ctx.workdir / "transcript.txt"
    json_path.write_bytes(msgspec.json.encode(transcript))
    txt_path.write_text(transcript.text + "\n", encoding="utf-8")
    outputs = [
        await ctx.save_output(json_path, f"{stem}.json", "application/json"),
        await ctx.save_output(txt_path, f"{stem}.txt", "text/plain; charset=utf-8"),
    ]
    result: dict[str, Any] = msgspec.to_builtins(transcript)
    result["outputs"] = outputs
    return result


async def generate_srt(ctx: JobContext) -> dict[str, Any]:
    """Speech to subtitles: validated .srt and .vtt files."""
    params = parse_params(ctx.params, GenerateSrtParams)
    source, transcript = await _transcript(ctx, params)
    segments = [
        subtitles.Segment(
            start=s.start,
            end=s.end,
            text=s.text,
            words=[subtitles.Word(w.start, w.end, w.word) for w in s.words] if s.words else None,
        )
        for s in transcript.segments
    ]
    cues = subtitles.build_cues(
        segments, max_line_length=params.max_line_length, max_lines_per_cue=params.max_lines_per_cue,
        max_cue_duration=params.max_cue_duration,
    )  # fmt: skip
    srt, vtt = subtitles.to_srt(cues), subtitles.to_vtt(cues)
    subtitles.validate_srt(srt)
    subtitles.validate_vtt(vtt)
    srt_path, vtt_path = ctx.workdir / "subtitles.srt", ctx.workdir / "subtitles.vtt"
    srt_path.write_text(srt, encoding="utf-8")
    vtt_path.write_text(vtt, encoding="utf-8")
    outputs = [
        await ctx.save_output(srt_path, f"{source.stem}.srt", "application/x-subrip"),
        await ctx.save_output(vtt_path, f"{source.stem}.vtt", "text/vtt"),
    ]
    return {
        "language": transcript.language, "duration": transcript.duration_s, "cues": len(cues),
        "text": transcript.text, "outputs": outputs,
    }  # fmt: skip
