"""P4: transcription through jobcast vs bare faster-whisper, same model, params and threads."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    MEDIA,
    Http,
    median,
    nats_server,
    run_job,
    scaled,
    start_api,
    start_worker,
    table,
    upload,
    wait_workers,
    write_json,
)

FILES = {"jfk.flac (11 s)": MEDIA / "jfk.flac", "speech60.mp3 (60 s)": MEDIA / "speech60.mp3"}
ROUNDS = scaled(5, 2)
TARGET_RATIO, TARGET_FIXED_MS = 1.02, 50.0


def _bare_model() -> Any:
    """The model as the worker's cache builds it: tiny.en, CPU int8, default threads, one worker."""
    from faster_whisper import WhisperModel

    from workers.whisper import resolve_model

    return WhisperModel(
        resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=0, num_workers=1
    )


def _bare(model: Any, path: Path) -> float:
    """Decode and transcribe with jobcast's defaults (beam 5, no VAD, no word times)."""
    from faster_whisper.audio import decode_audio

    began = time.perf_counter()
    audio = decode_audio(str(path), sampling_rate=model.feature_extractor.sampling_rate)
    segments, _ = model.transcribe(audio, beam_size=5, vad_filter=False, word_timestamps=False)
    text = " ".join(s.text.strip() for s in segments)
    assert text
    return time.perf_counter() - began


async def run() -> dict[str, Any]:
    """Warm both sides on jfk.flac, then alternate bare and jobcast runs of each file."""
    model = await asyncio.to_thread(_bare_model)
    bare: dict[str, list[float]] = {name: [] for name in FILES}
    ours: dict[str, list[float]] = {name: [] for name in FILES}
    with tempfile.TemporaryDirectory() as tmp:
        async with nats_server(Path(tmp)) as nats:
            api, url = await start_api(nats.url, Path(tmp) / "data")
            worker = start_worker(nats.url, Path(tmp) / "data", pool="gpu")
            try:
                await wait_workers(nats.url, 1)
                ids = {name: await upload(url, path) for name, path in FILES.items()}
                conn = await Http.open(url)
                first = next(iter(FILES))
                # `cache: false`: the same file again would be answered from the stage cache.
                await run_job(
                    conn, {"type": "transcribe", "file_id": ids[first], "cache": False}
                )  # loads the model
                await asyncio.to_thread(_bare, model, FILES[first])
                for _ in range(ROUNDS):
                    for name, path in FILES.items():
                        bare[name].append(await asyncio.to_thread(_bare, model, path))
                        seconds, _ = await run_job(
                            conn, {"type": "transcribe", "file_id": ids[name], "cache": False}
                        )
                        ours[name].append(seconds)
                conn.close()
            finally:
                worker.stop()
                api.stop()
    rows, figures = [], {}
    for name in FILES:
        b, o = median(bare[name]), median(ours[name])
        long = "60" in name
        met = (o / b <= TARGET_RATIO) if long else ((o - b) * 1000 <= TARGET_FIXED_MS)
        target = f"<= {TARGET_RATIO}x" if long else f"<= {TARGET_FIXED_MS:.0f} ms fixed overhead"
        figures[name] = {"bare_s": [round(x, 3) for x in bare[name]], "jobcast_s": [round(x, 3) for x in ours[name]],
                         "ratio": round(o / b, 3), "overhead_ms": round((o - b) * 1000, 1), "met": met}  # fmt: skip
        rows.append([name, b, o, (o - b) * 1000, f"{o / b:.3f}x", target, "met" if met else "not met"])
    table(
        f"P4 transcription (tiny.en, CPU int8, beam 5; median of {ROUNDS}, warm model)",
        ["file", "bare s", "jobcast s", "overhead ms", "ratio", "target", "result"],
        rows,
    )
    result = {"rounds": ROUNDS, "files": figures}
    write_json("transcription", result)
    return result


if __name__ == "__main__":
    asyncio.run(run())
