"""How much memory this process may still use when a control group caps it.

`max_memory="auto"` sizes the resident set from free memory. psutil (like `free`) reports the host's
memory, not a container's: inside a Docker or Kubernetes limit, or any memory cgroup, it would plan
a resident set the cgroup cannot hold and the kernel would kill the process. Neither psutil nor
torch reads cgroup limits, hence this module. Both hierarchies are read: v2 (`memory.max`, checked
at every ancestor) and v1 (`hierarchical_memory_limit`, which already folds the ancestors in).
Page cache charged to the cgroup counts as available: the kernel reclaims it before it kills.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_UNLIMITED = 1 << 60  # v1 reports "no limit" as ~2**63 rounded to pages


def _stat(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _mounts(proc_self: Path) -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of each cgroup mount, from mountinfo."""
    mounts = []
    for line in (proc_self / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            mounts.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return mounts


def _under(mount_root: str, mount_point: str, path: str) -> Path:
    """Where a /proc/self/cgroup path lives under a mount (whose root may be a sub-cgroup)."""
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return Path(mount_point) / ("" if rel == "." else rel)


def _v2_available(directory: Path, mount_point: Path) -> int | None:
    best = None
    while True:
        limit_file = directory / "memory.max"
        if limit_file.exists():
            raw = limit_file.read_text().strip()
            if raw != "max":
                used = int((directory / "memory.current").read_text())
                reclaimable = _stat(directory / "memory.stat").get("file", 0)
                free = max(0, int(raw) - (used - reclaimable))
                best = free if best is None else min(best, free)
        if directory == mount_point or directory.parent == directory:
            return best
        directory = directory.parent


def _v1_available(directory: Path) -> int | None:
    stat = _stat(directory / "memory.stat")
    limit = stat.get("hierarchical_memory_limit", _UNLIMITED)
    if limit >= _UNLIMITED:
        return None
    used = int((directory / "memory.usage_in_bytes").read_text())
    reclaimable = stat.get("total_cache", stat.get("cache", 0))
    return max(0, limit - (used - reclaimable))


def cgroup_available_memory(proc_self: str | os.PathLike[str] = "/proc/self") -> int | None:
    """Bytes this process's memory cgroups still allow (None: no limit, or no cgroup to read)."""
    proc = Path(proc_self)
    try:
        memberships = (proc / "cgroup").read_text().splitlines()
        mounts = _mounts(proc)
    except OSError:
        return None  # not Linux, or /proc hidden
    found: list[int] = []
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        for root, point, fstype, options in mounts:
            try:
                if controllers == "" and fstype == "cgroup2":
                    value = _v2_available(_under(root, point, path), Path(point))
                elif (
                    "memory" in controllers.split(",")
                    and fstype == "cgroup"
                    and "memory" in options
                ):
                    value = _v1_available(_under(root, point, path))
                else:
                    continue
            except (OSError, ValueError) as exc:  # a controller not enabled there, unreadable files
                logger.debug("cgroup memory limit at %s not readable: %s", point, exc)
                continue
            if value is not None:
                found.append(value)
    return min(found) if found else None
