"""How many CPUs this process may use, for ``workers = "auto"``: its affinity mask, capped by
a cgroup CPU quota (a container's CPU limit, which ``os.cpu_count()`` does not see).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs the scheduler lets us run on, rounded-up quota applied; at least 1."""
    count = len(os.sched_getaffinity(0))
    quota = cpu_quota(root, proc_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time per period the cgroup allows (1.5 for a 1500m limit); None: no limit."""
    for directory in _cgroup_dirs(root, proc_cgroup):
        try:  # cgroup v2: "max 100000" or "150000 100000"
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                return int(quota) / int(period)
            return None
        except (OSError, ValueError):
            pass
        try:  # cgroup v1: the cpu controller's CFS quota (-1: none)
            quota_us = int((directory / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((directory / "cpu" / "cpu.cfs_period_us").read_text())
            if quota_us > 0 and period_us > 0:
                return quota_us / period_us
        except (OSError, ValueError):
            pass
    return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Our own cgroup (v2, from /proc/self/cgroup) first, then the mount's root: inside a
    container with its own cgroup namespace the root is the container's cgroup."""
    dirs = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::/") and line != "0::/":
                dirs.append(root / line[len("0::/") :])
    except OSError:
        pass
    dirs.append(root)
    return dirs
