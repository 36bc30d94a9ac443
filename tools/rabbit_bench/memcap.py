"""Capping a child's memory (page cache included) and making files cold.

Order of preference (`probe_cap_method`):
1. `cgroup-v1` / `cgroup-v2`: a child memory cgroup of our own, with `memory.limit_in_bytes` /
   `memory.max` set below the model's size. The kernel then keeps at most that much of the child's
   anonymous memory *and* page cache; a model bigger than the cap is re-read from disk every token.
   The files are evicted first (so the child faults them in itself and is charged for them).
2. `evict`: no cgroup we may write to. The child runner evicts the checkpoint files' pages after
   every step instead (`madvise(MADV_PAGEOUT)` over its own mappings of them, then
   `posix_fadvise(DONTNEED)`), so the next step starts cold. Nothing caps memory in this mode.

Where this process's cgroups are (its /proc/self/cgroup and the cgroup mounts, mount roots
applied) is the engine's reading, `rabbit_engine.cgroup.memory_cgroups`: the limit the bench sets
is the one `max_memory="auto"` then reads back, so both must agree on the directories.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rabbit_engine.cgroup import memory_cgroups

MADV_PAGEOUT = 21
#: Files given by path, as the checkpoint helpers list them.
Paths = Sequence[str | os.PathLike[str]]
_libc = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


# ---- page cache ----------------------------------------------------------------------------
def evict_files(paths: Paths) -> None:
    """Drop the files' clean pages from the page cache (dirty ones are written back first)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def pageout_own_mappings(paths: Paths) -> int:
    """`madvise(MADV_PAGEOUT)` over this process's mappings of `paths` (pages still mapped survive
    `posix_fadvise` otherwise). Returns the number of mappings advised."""
    wanted = {str(Path(p).resolve()) for p in paths}
    n = 0
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if libc().madvise(start, end - start, MADV_PAGEOUT) == 0:
                n += 1
    return n


def resident_fraction(paths: Paths) -> float:
    """Share of the files' pages now in the page cache (mincore)."""
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                if libc().mincore(addr, size, vec) == 0:
                    resident += sum(b & 1 for b in vec)
                    total += npages
            finally:
                libc().munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def warm_files(paths: Paths, block: int = 16 << 20) -> None:
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def read_bandwidth(
    paths: Paths, block: int = 1 << 20, limit: int | None = None
) -> tuple[float, int]:
    """Evict, then read the files sequentially with read() (the first `limit` bytes, if given):
    (bytes/s, bytes).

    1 MiB reads: on the virtio disk this was written on, 16 MiB reads got half the bandwidth (each
    big read is one synchronous burst; small ones keep the kernel's async readahead pipelined)."""
    evict_files(paths)
    buf = bytearray(block)
    total = 0
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (limit is None or total < limit) and (n := f.readinto(buf)):
                total += n
    return total / (time.perf_counter() - start), total


def mmap_fault_bandwidth(paths: Paths) -> tuple[float, int]:
    """Evict, then touch every page of a read-only mapping in order (how mmap readers fault)."""
    import numpy as np

    evict_files(paths)
    total = 0
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            arr = np.frombuffer(mm, dtype=np.uint8)
            int(arr[:: mmap.PAGESIZE].sum())
            total += len(mm)
            del arr
            mm.close()
    return total / (time.perf_counter() - start), total


def drop_caches() -> bool:
    """Drop the whole page cache (root only; often read-only in containers)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


# ---- cgroups -------------------------------------------------------------------------------
class Cgroup:
    """A memory cgroup made for one child; `preexec` puts the forked child in it."""

    def __init__(self, version: int, path: Path) -> None:
        self.version = version
        self.path = path

    @property
    def method(self) -> str:
        return f"cgroup-v{self.version}"

    def set_limit(self, nbytes: int) -> None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / name).write_text(str(int(nbytes)))
        if self.version == 2:
            try:
                (self.path / "memory.swap.max").write_text("0")
            except OSError:
                pass

    def preexec(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        def read(name):
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None

        if self.version == 1:
            return {
                "peak_bytes": read("memory.max_usage_in_bytes"),
                "failcnt": read("memory.failcnt"),
            }
        events = {}
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                k, v = line.split()
                events[k] = int(v)
        except OSError:
            pass
        return {
            "peak_bytes": read("memory.peak"),
            "failcnt": events.get("max"),
            "oom_kill": events.get("oom_kill"),
        }

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def make_cgroup(name: str) -> tuple[Cgroup | None, str]:
    """A fresh child memory cgroup of ours, or (None, why not).

    v1 first (a `memory` hierarchy of its own), then v2 (the unified hierarchy, with the memory
    controller delegated to our subtree).
    """
    groups = memory_cgroups()
    if not groups:
        return None, "no memory cgroup in /proc/self/cgroup (or /proc unreadable)"
    reasons = []
    for group in groups:
        if group.version == 1:
            path = group.path / name
            try:
                path.mkdir()
            except OSError as e:
                reasons.append(f"v1 mkdir {path}: {e.strerror}")
                continue
            cg = Cgroup(1, path)
            try:
                cg.set_limit(1 << 62)
            except OSError as e:
                cg.remove()
                reasons.append(f"v1 limit: {e.strerror}")
                continue
            return cg, ""
        here = group.path
        try:
            controllers = (here / "cgroup.controllers").read_text().split()
        except OSError as e:
            reasons.append(f"v2 {here}: {e.strerror}")
            continue
        if "memory" not in controllers:
            have = " ".join(controllers) or "none"
            reasons.append(f"v2 {here}: memory controller not available ({have})")
            continue
        try:
            sub = (here / "cgroup.subtree_control").read_text().split()
            if "memory" not in sub:
                (here / "cgroup.subtree_control").write_text("+memory")
            path = here / name
            path.mkdir()
        except OSError as e:
            reasons.append(f"v2 delegate memory under {here}: {e.strerror}")
            continue
        return Cgroup(2, path), ""
    return None, "; ".join(reasons)


def probe_cap_method() -> tuple[str, str]:
    """('cgroup-v1' | 'cgroup-v2' | 'evict', detail)."""
    cg, why = make_cgroup(f"rabbit-bench-probe-{os.getpid()}")
    if cg is None:
        return "evict", why
    method = cg.method
    cg.remove()
    return method, str(cg.path.parent)
