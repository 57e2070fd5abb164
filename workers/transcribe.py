"""The `transcribe` and `generate_srt` operations: faster-whisper on the job's input file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from streams import MAX_INLINE_TEXT_BYTES, GenerateSrtParams, TranscribeParams, clip_text, parse_params
from workers import quality, subtitles
from workers._context import JobContext
from workers._errors import JobCancelledError, PermanentError
from workers.media import MediaError, probe
from workers.whisper import (
    AudioError,
    ModelError,
    Transcript,
    TranscriptionCancelled,
    TranscriptSegment,
    transcribe_ranges,
    transcript_text,
)
from workers.whisper import transcribe as run_whisper

log = logging.getLogger("jobcast.worker")


async def media_input(ctx: JobContext) -> Path:
    """The job's input file, once probed as media: "not a media file: … looks like text" beats a
    decoder error, and its duration sets the job's run-time limit."""
    source = await ctx.input_file()
    try:
        info = await ctx.run_blocking(probe, source)
    except MediaError as exc:
        raise PermanentError(str(exc)) from None
    ctx.media_duration(info.duration_s)
    return source


async def _transcript(ctx: JobContext, params: TranscribeParams) -> tuple[Path, Transcript]:
    source = await media_input(ctx)
    ctx.progress(0.0, "loading model")
    try:
        transcript = await ctx.run_blocking(
            run_whisper, source, model=params.model, language=params.language, task=params.task,
            beam_size=params.beam_size, vad_filter=params.vad_filter, word_timestamps=params.word_timestamps,
            initial_prompt=params.initial_prompt, device=params.device, compute_type=params.compute_type,
            progress=ctx.progress, cancelled=ctx.cancelled.is_set,
        )  # fmt: skip
    except (AudioError, ModelError) as exc:  # the same on every attempt
        raise PermanentError(str(exc)) from None
    except TranscriptionCancelled as exc:
        raise JobCancelledError(str(exc)) from None
    return source, transcript


async def _repaired(
    ctx: JobContext, params: TranscribeParams, source: Path, transcript: Transcript, limits: quality.Limits
) -> tuple[Transcript, quality.Repair]:
    """The transcript with its loops and empty or filler-only ranges transcribed again with safer
    decoding, where that came out better (see workers/quality.py)."""

    def rerun(ranges: list[tuple[float, float]]) -> list[list[TranscriptSegment]]:
        # 100 % is "done" (to the ETA too): the re-run is the last of the work, not past it.
        ctx.progress(99.9, f"quality gate: transcribing {len(ranges)} flagged ranges again")
        try:
            return transcribe_ranges(
                source, ranges, model=params.model, language=transcript.language, task=params.task,
                beam_size=params.beam_size, word_timestamps=params.word_timestamps,
                initial_prompt=params.initial_prompt, device=params.device, compute_type=params.compute_type,
                cancelled=ctx.cancelled.is_set,
            )  # fmt: skip
        except TranscriptionCancelled:
            raise
        except (AudioError, ModelError) as exc:
            raise quality.RerunError(str(exc)) from exc
        except Exception as exc:  # the first transcript is fine: an extra pass that fails only skips
            log.exception("quality gate re-run failed on %s", source.name)
            raise quality.RerunError(f"{type(exc).__name__}: {exc}") from exc

    try:
        segments, repair = await ctx.run_blocking(quality.repair_segments, transcript.segments, rerun, limits)
    except TranscriptionCancelled as exc:
        raise JobCancelledError(str(exc)) from None
    if not repair.kept:
        return transcript, repair
    return msgspec.structs.replace(transcript, text=transcript_text(segments), segments=segments), repair


async def _text_file(ctx: JobContext, text: str, stem: str) -> dict[str, Any]:
    """The full text stored as the job's .txt output."""
    path = ctx.workdir / "transcript.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return await ctx.save_output(path, f"{stem}.txt", "text/plain; charset=utf-8")


def _inline_text(ctx: JobContext, text: str, txt: dict[str, Any] | None) -> dict[str, Any]:
    """The result's `text`, cut to the inline bound (`text_truncated` says so), and the .txt that
    holds all of it."""
    inline, truncated = clip_text(text, min(ctx.settings.inline_text_bytes, MAX_INLINE_TEXT_BYTES))
    fields: dict[str, Any] = {"text": inline, "text_truncated": truncated}
    if txt is not None:
        fields |= {"text_file_id": txt["file_id"], "text_url": txt["url"]}
    return fields


async def transcribe(ctx: JobContext) -> dict[str, Any]:
    """Speech to text: the text (cut past the bound of a result), language and duration; the
    segments (and words) only in the .json output, the full text in the .txt."""
    params = parse_params(ctx.params, TranscribeParams)
    source, first = await _transcript(ctx, params)
    transcript, report = first, quality.OFF
    if params.quality_gate:
        limits = quality.Limits(max_cps=params.max_cps, min_cue_duration=params.min_cue_duration)
        transcript, repair = await _repaired(ctx, params, source, first, limits)
        report = quality.transcript_gate(first.segments, transcript.segments, repair, limits)
    json_path = ctx.workdir / "transcript.json"
    json_path.write_bytes(msgspec.json.encode(transcript))
    outputs = [
        await ctx.save_output(json_path, f"{source.stem}.json", "application/json"),
        await _text_file(ctx, transcript.text, source.stem),
    ]
    return {
        **_inline_text(ctx, transcript.text, outputs[1]), "language": transcript.language,
        "duration_s": transcript.duration_s, "quality": report, "outputs": outputs,
    }  # fmt: skip


async def generate_srt(ctx: JobContext) -> dict[str, Any]:
    """Speech to subtitles: validated .srt and .vtt files."""
    params = parse_params(ctx.params, GenerateSrtParams)
    source, transcript = await _transcript(ctx, params)
    limits = quality.Limits(
        max_cps=params.max_cps, min_cue_duration=params.min_cue_duration, max_cue_duration=params.max_cue_duration,
        max_line_length=params.max_line_length, max_lines_per_cue=params.max_lines_per_cue,
    )  # fmt: skip
    repair = None
    if params.quality_gate:
        transcript, repair = await _repaired(ctx, params, source, transcript, limits)
    segments = [
        subtitles.Segment(
            start=s.start,
            end=s.end,
            text=s.text,
            words=[subtitles.Word(w.start, w.end, w.word) for w in s.words] if s.words else None,
        )
        for s in transcript.segments
    ]
    if repair is not None:
        cues, report = quality.subtitle_gate(segments, repair, limits, media_end=transcript.duration_s)
    else:
        cues, report = quality.build_cues(segments, limits), quality.OFF
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
    text = _inline_text(ctx, transcript.text, None)
    if text["text_truncated"]:  # a .txt only when the text does not fit; the subtitles are the output
        outputs.append(await _text_file(ctx, transcript.text, source.stem))
        text = _inline_text(ctx, transcript.text, outputs[-1])
    return {
        "language": transcript.language, "duration": transcript.duration_s, "cues": len(cues), **text,
        "quality": report, "outputs": outputs,
    }  # fmt: skip
