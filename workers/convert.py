"""The `convert` operation: the job's input to MP4 (or M4A) with PyAV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from streams import ConvertParams, parse_params
from workers._context import JobContext
from workers._errors import JobCancelledError, PermanentError
from workers.media import ConversionCancelled, MediaError, convert_to_mp4, probe


async def convert(ctx: JobContext) -> dict[str, Any]:
    """Remux when the streams fit MP4 as they are, else transcode; the result says which ran."""
    params = parse_params(ctx.params, ConvertParams)
    source = await ctx.input_file()
    suffix, content_type = (".m4a", "audio/mp4") if params.audio_only else (".mp4", "video/mp4")
    target = ctx.workdir / f"converted{suffix}"
    try:
        ctx.media_duration((await ctx.run_blocking(probe, source)).duration_s)  # the limit grows with it
        done = await ctx.run_blocking(
            convert_to_mp4, source, target, video_codec=params.video_codec, crf=params.crf,
            bitrate=params.bitrate, max_height=params.max_height, audio_only=params.audio_only,
            progress=ctx.progress, cancelled=ctx.cancelled.is_set,
        )  # fmt: skip
    except MediaError as exc:
        raise PermanentError(str(exc)) from None
    except ConversionCancelled as exc:
        raise JobCancelledError(str(exc)) from None
    output = await ctx.save_output(target, f"{Path(source).stem}{suffix}", content_type)
    result: dict[str, Any] = msgspec.to_builtins(done)
    result["outputs"] = [output]
    return result
