"""A process's CPU and memory use: what each worker puts in its heartbeat and the API adds to the
queue stats (docs/architecture.md, "Queue stats").

CPU use is the rate of the process's CPU time (all its threads, whisper's and PyAV's included)
over a fixed window, sampled by a supervised task: reading it changes nothing, so two callers in
a row get the same figure, and no caller can shorten the window it covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time

from streams._config import worker_ttl


def usage_window_s() -> float:
    """CPU use is averaged over windows this long: a third of the worker TTL, the heartbeat
    interval, so every heartbeat carries a window that the previous one did not."""
    return worker_ttl() / 3


def rss_mb() -> float:
    """Resident memory of this process in MB (its peak where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as statm:
        return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _sample() -> tuple[float, float]:
    return time.monotonic(), time.process_time()


class ProcessUsage:
    """This process's CPU use over its last full window, in percent of one core (like `top`: a
    process busy on two cores reads 200)."""

    def __init__(self, window_s: float | None = None) -> None:
        self.window_s = window_s if window_s is not None else usage_window_s()
        first = _sample()
        self._window = (first, first)
        """The samples that bound the last full window (both the start until one is full)."""

    def cpu_percent(self) -> float:
        """CPU use over the last full window; before the first one has passed, since the start."""
        (start, start_cpu), (end, end_cpu) = self._window
        if end <= start:
            end, end_cpu = _sample()
        wall = end - start
        return round(100.0 * (end_cpu - start_cpu) / wall, 1) if wall > 0 else 0.0

    def sample(self) -> None:
        """Close the current window and open the next."""
        self._window = (self._window[1], _sample())

    async def run(self) -> None:
        """Sample every `window_s`, for ever (run it under a TaskSupervisor)."""
        while True:
            await asyncio.sleep(self.window_s)
            self.sample()
