"""The `detect_language` operation: faster-whisper's language detection on the job's input file."""

from __future__ import annotations

from typing import Any

from streams import DetectLanguageParams, parse_params
from workers._context import JobContext
from workers._errors import PermanentError
from workers.transcribe import media_input
from workers.whisper import AudioError, ModelError
from workers.whisper import detect_language as run_detection


async def detect_language(ctx: JobContext) -> dict[str, Any]:
    """The language spoken in the first 30 s (an ISO code, as whisper names it) and the model's
    confidence in it; an English-only model answers `en` with confidence 1."""
    params = parse_params(ctx.params, DetectLanguageParams)
    source = await media_input(ctx)
    ctx.progress(0.0, "loading model")
    try:
        language, probability = await ctx.run_blocking(
            run_detection, source, model=params.model, device=params.device, compute_type=params.compute_type
        )
    except (AudioError, ModelError) as exc:  # the same on every attempt
        raise PermanentError(str(exc)) from None
    ctx.progress(100.0, f"detected {language}")
    return {"language": language, "language_probability": probability}
