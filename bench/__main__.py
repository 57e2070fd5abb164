"""Run the benchmarks: `python -m bench [p1 p2 ...] [--quick]` (all of them by default)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time

BENCHMARKS = {
    "p1": ("dispatch", "sequential dispatch latency"),
    "p2": ("throughput", "jobs/s vs Celery + Redis"),
    "p3": ("fanout", "SSE fan-out: memory, deliveries/s, broadcast p99"),
    "p4": ("transcription", "jobcast vs bare faster-whisper"),
    "p5": ("convert", "remux vs transcode vs the ffmpeg CLI"),
    "p6": ("memory", "API and worker RSS"),
    "p7": ("cluster", "3-node cluster vs one node: jobs/s, failover gap, SSE wait"),
    "p8": ("pipeline", "a subtitle pipeline on jfk.flac: first run vs cached"),
    "eta": ("eta", "ETA error on repeated runs of jfk.flac and speech60.mp3"),
    "profile": ("profile", "where the API's CPU per job goes, by hop (P1 under py-spy)"),
}
LIMIT_S = {
    "p1": 300,
    "p2": 600,
    "p3": 900,
    "p4": 300,
    "p5": 300,
    "p6": 180,
    "p7": 300,
    "p8": 300,
    "eta": 240,
    "profile": 300,
}
"""Each benchmark's time bound (full run); a quick run gets the same bounds."""


def main() -> int:
    """Parse the selection, run each benchmark in turn, each bounded in time."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="*", metavar="p1..p8|eta|profile", help="default: all")
    parser.add_argument("--quick", action="store_true", help="smaller counts (a few minutes in all)")
    args = parser.parse_args()
    unknown = set(args.which) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"  # read by bench.harness at import
    failed = []
    for key in args.which or [key for key in BENCHMARKS if key != "profile"]:  # profile: on demand
        name, what = BENCHMARKS[key]
        print(f"\n=== {key.upper()} {name}: {what}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        began = time.perf_counter()
        try:
            asyncio.run(asyncio.wait_for(module.run(), LIMIT_S[key]))
        except Exception as exc:  # one benchmark failing must not hide the others' figures
            print(f"{key} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(key)
        print(f"({key} took {time.perf_counter() - began:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
