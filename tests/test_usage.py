"""What a process may use of its machine: its CPUs (affinity, cgroup quota) and which machine it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from streams import Cgroups, machine_id, usable_cpus


def cgroups(tmp_path: Path, membership: str, files: dict[str, str]) -> Cgroups:
    """A cgroup filesystem under `tmp_path` as the kernel shows it, with this process in `membership`."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    return Cgroups(root=tmp_path, membership=tmp_path / "self-cgroup")


def test_cpu_quota_of_a_cgroup(tmp_path: Path) -> None:
    """A container's `cpus:` is its cgroup's CPU quota: the tightest of the process's cgroup and the
    cgroups above it, on cgroup v2 (cpu.max) and v1 (the CFS quota)."""
    v2 = {
        "cpu.max": "max 100000\n",
        "app.slice/cpu.max": "150000 100000\n",
        "app.slice/jobcast/cpu.max": "max 100000\n",
    }
    assert cgroups(tmp_path / "v2", "0::/app.slice/jobcast\n", v2).cpu_quota() == 1.5
    # in a container without a cgroup namespace, its cgroup is the root while its path is the host's
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    membership = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"
    assert cgroups(tmp_path / "v1", membership, v1).cpu_quota() == 0.5
    assert cgroups(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"}).cpu_quota() == 0.0
    assert usable_cpus(4, 0.5) == 0.5
    assert usable_cpus(2, 0.0) == usable_cpus(2, 3.0) == 2.0


def test_cpus_follow_the_affinity_mask() -> None:
    """A process pinned to one CPU may use one (fewer under a quota), however many the machine has."""
    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from streams import ProcessUsage; print(ProcessUsage().cpus())"
    )
    pinned = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert float(pinned.stdout) == usable_cpus(1, Cgroups().cpu_quota())


def test_a_machine_is_its_kernel() -> None:
    """Every process on one kernel names the same machine: its boot id, not its container's hostname."""
    script = "from streams import machine_id; print(machine_id())"
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert child.stdout.strip() == machine_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
