"""How many CPUs this process may really use: the container's quota, not the host's cores.

``os.cpu_count()`` in a pod reports the node's cores (64 on a big node) while the pod's
cgroup may allow two; thread pools sized from it oversubscribe the quota and get
throttled. ``cpu_limit`` reads the cgroup quota (v2 ``cpu.max``, else v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounds a fractional quota up, and takes
the smaller of it and the CPUs this process is pinned to (``sched_getaffinity``).
An explicit limit (a setting fed by the downward API) wins over the quota. Parsing is
pure and takes the cgroup root as an argument, so it is tested on real file contents
in a temp folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def quota_from_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ("200000 100000"); None for "max" or junk."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def quota_from_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; -1 means none."""
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def own_cgroups(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's v2 and v1-cpu cgroup paths from ``/proc/self/cgroup`` text ("0::/a/b",
    "4:cpu,cpuacct:/a/b"). Without a cgroup namespace (older runtimes) the container's limits
    sit there below the mount, not at its top."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _below(root: Path, path: str | None) -> list[Path]:
    inner = (path or "/").strip("/")
    return [root / inner, root] if inner else [root]


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup under ``root`` (v2 first, then v1), or None if
    unlimited. ``proc_cgroup`` is ``/proc/self/cgroup``'s text (read when None)."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2_path, v1_path = own_cgroups(proc_cgroup)
    for folder in _below(root, v2_path):
        v2 = _read(folder / "cpu.max")
        if v2 is not None:
            return quota_from_cpu_max(v2)
    for base in (root / "cpu", root / "cpu,cpuacct", root):
        for folder in _below(base, v1_path):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is not None and period is not None:
                return quota_from_cfs(quota, period)
    return None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (taskset, cpuset), or the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_limit(
    explicit: float = 0,
    root: Path = CGROUP_ROOT,
    available: int | None = None,
    proc_cgroup: str | None = None,
) -> int:
    """Whole CPUs to size thread pools by: ``explicit`` (if > 0) or the cgroup quota, rounded
    up, never more than ``available`` (default: the affinity mask) and never below 1."""
    cap = available if available is not None else affinity_cpus()
    limit = explicit if explicit > 0 else cgroup_quota(root, proc_cgroup)
    if limit is None:
        return max(1, cap)
    return max(1, min(cap, math.ceil(limit - 1e-9)))
