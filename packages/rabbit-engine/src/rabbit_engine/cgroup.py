"""How much memory this process may still use when a control group caps it.

`max_memory="auto"` sizes the resident set from free memory. psutil (like `free`) reports the host's
memory, not a container's: inside a Docker or Kubernetes limit, or any memory cgroup, it would plan
a resident set the cgroup cannot hold and the kernel would kill the process. Neither psutil nor
torch reads cgroup limits, hence this module. Both hierarchies are read: v2 (`memory.max`, checked
at every ancestor) and v1 (`hierarchical_memory_limit`, which already folds the ancestors in).
Page cache charged to the cgroup counts as available: the kernel reclaims it before it kills.
`memory_cgroups` is the one reader of /proc/self/cgroup and the cgroup mounts: the bench
(tools/rabbit_bench) places the memory cgroups it makes for its cold regime with it too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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
    root = mount_root.rstrip("/") + "/"
    inside = path == mount_root or (path + "/").startswith(root)
    rel = os.path.relpath(path, mount_root) if inside else path.lstrip("/")
    return Path(mount_point) / ("" if rel == "." else rel)


@dataclass(frozen=True)
class MemoryCgroup:
    """This process's place in one memory hierarchy: `path` is its own cgroup directory (the
    mount's root already applied, so it is right inside a cgroup namespace too)."""

    version: int  # 1: a v1 `memory` hierarchy; 2: the unified hierarchy
    path: Path
    mount_point: Path


def memory_cgroups(proc_self: str | os.PathLike[str] = "/proc/self") -> list[MemoryCgroup]:
    """The cgroup directories of this process that may hold a memory limit, v1 ones first.

    A v2 entry does not promise that the memory controller is enabled there; reading its files
    tells. Empty when /proc is unreadable (not Linux, or hidden).
    """
    proc = Path(proc_self)
    try:
        memberships = (proc / "cgroup").read_text().splitlines()
        mounts = _mounts(proc)
    except OSError:
        return []
    found: list[MemoryCgroup] = []
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        for root, point, fstype, options in mounts:
            if controllers == "" and fstype == "cgroup2":
                version = 2
            elif "memory" in controllers.split(",") and fstype == "cgroup" and "memory" in options:
                version = 1
            else:
                continue
            found.append(MemoryCgroup(version, _under(root, point, path), Path(point)))
    return sorted(found, key=lambda cg: cg.version)


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
    found: list[int] = []
    for group in memory_cgroups(proc_self):
        try:
            if group.version == 2:
                value = _v2_available(group.path, group.mount_point)
            else:
                value = _v1_available(group.path)
        except (OSError, ValueError) as exc:  # a controller not enabled there, unreadable files
            logger.debug("cgroup memory limit at %s not readable: %s", group.path, exc)
            continue
        if value is not None:
            found.append(value)
    return min(found) if found else None


@dataclass(frozen=True)
class RamFacts:
    """The RAM this process can still use: the machine's and its memory cgroup's figures."""

    host_available: int
    host_total: int
    cgroup_available: int | None  # None: no memory cgroup limit applies

    @property
    def available(self) -> int:
        """What applies: the smaller of the two (a container's limit binds before the host's)."""
        if self.cgroup_available is None:
            return self.host_available
        return min(self.host_available, self.cgroup_available)

    @property
    def bound_by_cgroup(self) -> bool:
        return self.cgroup_available is not None and self.cgroup_available < self.host_available


def ram_facts(proc_self: str | os.PathLike[str] = "/proc/self") -> RamFacts:
    """psutil reports the host's free RAM even inside a container; the cgroup says what is left
    to us. Both are read here so `max_memory="auto"` and `rabbit doctor` agree."""
    import psutil  # imported here: reading a cgroup alone needs nothing outside the stdlib

    vm = psutil.virtual_memory()
    return RamFacts(vm.available, vm.total, cgroup_available_memory(proc_self))
