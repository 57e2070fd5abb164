"""P8: a pipeline of generate_srt -> fix_srt -> translate_srt(de, fr) on jfk.flac, first and cached.

The API, a gpu worker and an llm worker run as processes against one nats-server; the LLM is the
local OpenAI-wire stand-in the tests use (tests/llm_server.py: it answers at once), so what is
measured is jobcast's part and whisper's, not a model's. A first run transcribes; the same
pipeline on the same bytes again finds its generate_srt stage in the stage cache. Each run is
timed from the submit to the pipeline's terminal SSE event; each stage's run time is its
started_at -> completed_at.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    MEDIA,
    Http,
    follow_to_end,
    median,
    nats_server,
    scaled,
    start_api,
    start_worker,
    table,
    upload,
    wait_workers,
    write_json,
)

STAGES = [
    {"type": "generate_srt", "params": {}},
    {"type": "fix_srt", "params": {}},
    {"type": "translate_srt", "params": {"languages": ["de", "fr"]}},
]
ROUNDS = scaled(3, 1)
"""Cached runs after the first (each on the same bytes)."""


async def run_pipeline(conn: Http, file_id: str) -> tuple[float, str]:
    """Submit the pipeline and follow its SSE stream to the end: seconds, and its id."""
    import msgspec

    began = time.perf_counter()
    body = msgspec.json.encode({"file_id": file_id, "stages": STAGES})
    status, answer = await conn.request("POST", "/api/v1/pipelines", body)
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {answer[:300]!r}")
    job_id: str = msgspec.json.decode(answer)["id"]
    elapsed, _ = await follow_to_end(conn, job_id, began)
    return elapsed, job_id


async def stage_times(url: str, job_id: str) -> list[tuple[str, float, bool]]:
    """Each stage's type, run time (started -> completed) and whether the cache served it."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        children = (await client.get(f"/api/v1/jobs/{job_id}/children")).json()
    items = children["items"] if isinstance(children, dict) else children
    times = []
    for child in items:
        started, done = (datetime.fromisoformat(child[k]) for k in ("started_at", "completed_at"))
        cached = bool((child.get("result") or {}).get("cached"))
        times.append((child["type"], (done - started).total_seconds(), cached))
    return times


async def run() -> dict[str, Any]:
    """One first run, then ROUNDS cached ones, on one API, a gpu and an llm worker."""
    from tests.llm_server import FakeLLM

    with FakeLLM() as llm, tempfile.TemporaryDirectory() as tmp:
        async with nats_server(Path(tmp)) as nats:
            env = {"JOBCAST_LLM_BASE_URL": llm.base_url, "JOBCAST_LLM_API_KEY": "bench"}
            api, url = await start_api(nats.url, Path(tmp) / "data", **env)
            workers = [
                start_worker(nats.url, Path(tmp) / "data", pool="gpu", **env),
                start_worker(nats.url, Path(tmp) / "data", pool="llm", **env),
            ]
            try:
                await wait_workers(nats.url, 2)
                file_id = await upload(url, MEDIA / "jfk.flac")
                conn = await Http.open(url)
                first_s, first_id = await run_pipeline(conn, file_id)
                first = await stage_times(url, first_id)
                cached_s, cached = [], []
                for _ in range(ROUNDS):
                    seconds, job_id = await run_pipeline(conn, file_id)
                    cached_s.append(seconds)
                    cached.append(await stage_times(url, job_id))
                conn.close()
            finally:
                for worker in workers:
                    worker.stop()
                api.stop()
    again = median(cached_s)
    rows = [["first (model loaded by it)", first_s, *(t for _, t, _ in first), "no"]]
    rows += [[f"cached #{n + 1}", s, *(t for _, t, _ in c), "yes" if c[0][2] else "NO"]
             for n, (s, c) in enumerate(zip(cached_s, cached, strict=True))]  # fmt: skip
    table(
        "P8 pipeline generate_srt -> fix_srt -> translate_srt(de, fr) on jfk.flac (stand-in LLM)",
        ["run", "wall s", *(f"{name} s" for name, _, _ in first), "generate_srt cached"],
        rows,
    )
    result = {
        "first_s": round(first_s, 3),
        "cached_s": [round(s, 3) for s in cached_s],
        "cached_median_s": round(again, 3),
        "ratio": round(again / first_s, 3),
        "first_stages": [{"type": n, "run_s": round(t, 3), "cached": c} for n, t, c in first],
        "cached_stages": [
            [{"type": n, "run_s": round(t, 3), "cached": c} for n, t, c in run] for run in cached
        ],
        "all_cached_runs_hit": all(c[0][2] for c in cached),
    }
    write_json("pipeline", result)
    return result


if __name__ == "__main__":
    asyncio.run(run())
