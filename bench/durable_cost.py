"""Cost of durable mode: sequential submissions through the API, default vs JOBCAST_DURABLE=1.

Each mode runs in the same process, on the same disk, one after the other; the figure to
read is the ratio, since these machines are shared and noisy.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import Settings
from streams import NatsServer
from tests.conftest import ApiServer

JOBS = int(os.environ.get("BENCH_JOBS", "300"))


async def run(durable: bool) -> dict[str, float]:
    """Submit JOBS noop jobs one after another; submissions/s and latency percentiles."""
    os.environ["JOBCAST_DURABLE"] = "1" if durable else ""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        await nats.start()
        api = ApiServer(Settings(data_dir=Path(tmp) / "data", nats_url=nats.url, rate_limit_per_minute=10**9))
        await api.start()
        latencies = []
        try:
            async with httpx.AsyncClient(base_url=api.url) as client:
                for _ in range(20):  # warm up
                    await client.post("/api/v1/jobs", json={"type": "noop"})
                began = time.perf_counter()
                for _ in range(JOBS):
                    start = time.perf_counter()
                    response = await client.post("/api/v1/jobs", json={"type": "noop"})
                    latencies.append(time.perf_counter() - start)
                    assert response.status_code == 202, response.text
                elapsed = time.perf_counter() - began
        finally:
            await api.stop()
            await nats.stop()
    latencies.sort()
    return {
        "submits_per_s": round(JOBS / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


async def main() -> None:
    """Both modes, then the ratio."""
    default = await run(durable=False)
    durable = await run(durable=True)
    ratio = round(default["submits_per_s"] / durable["submits_per_s"], 2)
    print(json.dumps({"jobs": JOBS, "default": default, "durable": durable, "slowdown": ratio}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
