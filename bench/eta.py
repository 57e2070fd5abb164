"""ETA: how far the `eta_s` a transcription shows is from the time it then takes, over repeated
runs of jfk.flac and speech60.mp3 (tiny.en, CPU, beam 5, the stage cache off so every run runs).

For each run: the first estimate (right after the input is probed, ~0 %) and the one at the first
progress event at or past 50 %, each against the seconds from that event to `completed`. The
files share one learned speed (seconds per second of media), so the first long run after short
ones shows what a fixed per-job cost (download, probe) does to it.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    MEDIA,
    nats_server,
    scaled,
    start_api,
    start_worker,
    table,
    upload,
    wait_workers,
    write_json,
)

FILES = {"jfk.flac": MEDIA / "jfk.flac", "speech60.mp3": MEDIA / "speech60.mp3"}
ROUNDS = scaled(5, 2)
"""Runs of each file, one file after the other (under a minute in all on two cores)."""


def _error(predicted: float | None, actual: float) -> float | None:
    """(predicted - actual) / actual in percent; None without a prediction."""
    return None if predicted is None or actual <= 0 else round(100.0 * (predicted - actual) / actual, 1)


async def _one_run(client: Any, file_id: str) -> dict[str, Any]:
    """Submit a transcription and read its events to the end: its estimates and its real times."""
    from httpx_sse import aconnect_sse

    response = await client.post(
        "/api/v1/jobs", json={"type": "transcribe", "file_id": file_id, "cache": False}
    )
    response.raise_for_status()
    job_id = response.json()["id"]
    estimates: list[tuple[float, float, datetime]] = []  # (progress, eta_s, ts)
    end = None
    async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events") as source:
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            envelope = json.loads(sse.data)
            ts = datetime.fromisoformat(envelope["event"]["ts"])
            if envelope["kind"] == "progress" and envelope["eta_s"] is not None:
                estimates.append((envelope["progress"], envelope["eta_s"], ts))
            if envelope["kind"] in ("completed", "failed", "cancelled"):
                if envelope["kind"] != "completed":
                    raise RuntimeError(f"job {job_id} {envelope['kind']}")
                end = ts
    assert end is not None
    # Whisper's progress moves by segments: the estimate nearest 50 % among those strictly between
    # the start and the end (one at 100 % has nothing left to predict).
    between = [e for e in estimates if 0.0 < e[0] < 100.0]
    start = estimates[0] if estimates and estimates[0][0] < 100.0 else None
    half = min(between, key=lambda e: abs(e[0] - 50.0)) if between else None
    run: dict[str, Any] = {}
    for name, estimate in (("start", start), ("half", half)):
        actual = None if estimate is None else (end - estimate[2]).total_seconds()
        run[name] = {
            "eta_s": None if estimate is None else estimate[1],
            "actual_s": None if actual is None else round(actual, 2),
            "error_pct": None if estimate is None or actual is None else _error(estimate[1], actual),
            "at_progress": None if estimate is None else estimate[0],
        }
    return run


async def run() -> dict[str, Any]:
    """One API and one gpu worker; each file ROUNDS times in turn, every run's estimates kept."""
    import httpx

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with nats_server(Path(tmp)) as nats:
            api, url = await start_api(nats.url, Path(tmp) / "data")
            worker = start_worker(nats.url, Path(tmp) / "data", pool="gpu")
            try:
                await wait_workers(nats.url, 1)
                ids = {name: await upload(url, path) for name, path in FILES.items()}
                async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                    for name in FILES:
                        for round_ in range(1, ROUNDS + 1):
                            runs.append({"file": name, "run": round_, **await _one_run(client, ids[name])})
            finally:
                worker.stop()
                api.stop()
    rows = [
        [r["file"], r["run"], r["start"]["eta_s"], r["start"]["actual_s"], r["start"]["error_pct"],
         r["half"]["at_progress"], r["half"]["eta_s"], r["half"]["actual_s"], r["half"]["error_pct"]]
        for r in runs
    ]  # fmt: skip
    table(
        "ETA error, transcribe tiny.en (CPU, beam 5); predicted vs actual seconds left",
        ["file", "run", "eta at start", "actual", "error %", "mid %", "eta mid", "actual", "error %"],
        rows,
    )
    result = {"rounds": ROUNDS, "runs": runs}
    write_json("eta", result)
    return result
