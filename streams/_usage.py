"""A process's CPU and memory use: what each worker puts in its heartbeat and the API adds to the
queue stats (docs/architecture.md, "Queue stats").

CPU use is the rate of the process's CPU time (all its threads, whisper's and PyAV's included)
over a fixed window, sampled by a supervised task: reading it changes nothing, so two callers in
a row get the same figure, and no caller can shorten the window it covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from streams._buckets import worker_ttl


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


@functools.cache
def machine_id() -> str:
    """The kernel this process runs on: its boot id, the same in every container of one machine
    (their hostnames differ), new at every boot; the hostname where the kernel does not show one."""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as boot_id:
        if found := boot_id.read().strip():
            return found
    return socket.gethostname()


def usable_cpus(count: float, quota: float) -> float:
    """The CPUs a process may use: those it may run on (`count`), fewer under a CPU quota (0: none)."""
    return min(count, quota) if quota > 0 else float(count)


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where Linux shows this process's cgroups, and so its CPU quota (a container's `cpus:`)."""

    root: Path = Path("/sys/fs/cgroup")
    """The cgroup filesystem: v2's one tree, or v1's trees named by their controllers (`cpu/`)."""
    membership: Path = Path("/proc/self/cgroup")
    """This process's cgroup in each tree: `0::/path` on v2, `N:cpu,cpuacct:/path` on v1."""

    def cpu_quota(self) -> float:
        """The CPUs the tightest quota of this process's cgroup and the cgroups above it allows
        (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`); 0: no quota."""
        quotas = []
        for tree, path, v2 in self._trees():
            relative = PurePosixPath(path).relative_to("/")
            # A container may see its own cgroup mounted as the root while its path names it in the
            # host's tree: the levels of that path that exist here are the ones that apply.
            for level in (relative, *relative.parents):
                with contextlib.suppress(OSError, ValueError, ZeroDivisionError):
                    quotas.append(_quota(tree / level, v2=v2))
        return min((quota for quota in quotas if quota > 0), default=0.0)

    def _trees(self) -> list[tuple[Path, str, bool]]:
        """The trees that hold a CPU quota for this process: each with its cgroup's path there, and
        whether it is v2's."""
        trees = []
        with contextlib.suppress(OSError, ValueError), open(self.membership) as membership:
            for line in membership:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if not controllers:
                    trees.append((self.root, path, True))
                elif "cpu" in controllers.split(","):
                    trees.append((self.root / controllers, path, False))
        return trees


def _quota(cgroup: Path, *, v2: bool) -> float:
    """The CPUs one cgroup's quota allows (0: none)."""
    if v2:
        quota, period = (cgroup / "cpu.max").read_text().split()
    else:
        quota, period = (
            (cgroup / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        )
    return 0.0 if quota in ("max", "-1") else int(quota) / int(period)


def _sample() -> tuple[float, float]:
    return time.monotonic(), time.process_time()


class ProcessUsage:
    """This process's CPU use over its last full window, in percent of one core (like `top`: a
    process busy on two cores reads 200)."""

    def __init__(self, window_s: float | None = None) -> None:
        self.window_s = window_s if window_s is not None else usage_window_s()
        self.cgroups = Cgroups()
        """Where this process's CPU quota is read from."""
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

    def cpus(self) -> float:
        """The CPUs this process may use now: its affinity, narrowed by its cgroups' CPU quota."""
        return usable_cpus(cpu_count(), self.cgroups.cpu_quota())

    def sample(self) -> None:
        """Close the current window and open the next."""
        self._window = (self._window[1], _sample())

    async def run(self) -> None:
        """Sample every `window_s`, for ever (run it under a TaskSupervisor)."""
        while True:
            await asyncio.sleep(self.window_s)
            self.sample()
