"""Bringing a layer's bytes in ahead of use, for local files, in the prefetch thread; and the
page-table hints the local strategy gives the kernel (cool the layer just used, unmap copied pages).

`madvise(WILLNEED)` is only a hint: measured under a memory cap, the compute thread still took most
of the page faults itself, in forward order, while reclaim took the unreferenced read-ahead pages
first. What works is reading the layer in file order *and waiting for it*. Best is
`madvise(MADV_POPULATE_READ)` (Linux >= 5.14) on the reader's own mapping: it reads the pages and
fills the page tables the tensor views use, so compute takes no faults at all. It is called through
ctypes because CPython's `mmap.madvise` holds the GIL for the whole call, which would stall the
compute thread's Python between kernels (measured: 1.27-1.30 s/token via ctypes vs 1.46-1.49 s via
mmap.madvise, floor 1.155 s). Where populate is unavailable, plain `pread` calls (which release the
GIL) fill the page cache instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from rabbit_store import LayerReader

CHUNK = 8 << 20  # bytes per pread: large sequential requests, one reusable scratch buffer
MADV_POPULATE_READ = 22
MADV_COLD = 20  # Linux >= 5.4: deactivate (reclaim these first), contents kept
MADV_DONTNEED = 4  # unmap: a private file mapping re-reads the file if touched again

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # no libc madvise (not Linux): pread only
    _libc = None


class MappedSpan(NamedTuple):
    """Bytes [start, end) of a local file, and the reader's map of it (None: pread only)."""

    path: str
    start: int
    end: int
    mapping: mmap.mmap | None


def _address(mapping: mmap.mmap) -> int:
    # The temporary buffer export ends with this statement, so the map can still close.
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def mapped_range(mapping: mmap.mmap) -> range:
    """The addresses a map covers: whether a tensor's memory is a view of the file."""
    start = _address(mapping)
    return range(start, start + len(mapping))


def unmap(spans: Iterable[MappedSpan]) -> None:
    """Drop our page-table entries for ranges whose bytes were copied elsewhere.

    The pages stay in the page cache (the kernel's to keep or drop) but leave this process's
    RSS: after the resident weights are copied out of the mapped files, peak RSS would
    otherwise count them twice. Only whole pages inside each range are dropped; the mapping is
    never written, so any page touched again later just faults back in from the file.
    """
    if _libc is None:
        return
    for _, start, end, mapping in spans:
        if mapping is None:
            continue
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = min(end, len(mapping)) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _libc.madvise(_address(mapping) + first, last - first, MADV_DONTNEED)


def mapped_spans(reader: LayerReader, spans: Iterable[tuple[str, int, int]]) -> list[MappedSpan]:
    """`(file, start, end)` spans of the reader's files as MappedSpans (local path and map); spans
    of files that are not local are left out."""
    out = []
    for file, start, end in spans:
        path = reader.local_path(file)
        if path is not None:
            out.append(MappedSpan(path, start, end, reader.mapping(file)))
    return out


class PageWarmer:
    """`warm` runs in the prefetch thread, `cool` in the compute thread; they share only the
    cache of mapping addresses (a dict, safe under the GIL)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._bases: dict[int, int] = {}
        self._scratch = memoryview(bytearray(CHUNK))
        self._populate = _libc is not None
        self._cool = _libc is not None

    def warm(self, spans: Iterable[MappedSpan]) -> int:
        """Bring `(path, start, end, mapping)` ranges in; returns the bytes covered."""
        total = 0
        for path, start, end, mapping in spans:
            if mapping is not None and self._populate and self._populate_range(mapping, start, end):
                total += end - start
                continue
            total += self._pread(path, start, end)
        return total

    def cool(self, spans: Iterable[MappedSpan]) -> int:
        """Mark mapped ranges just used as the first pages to reclaim; returns the bytes the kernel
        took the hint for (0 where it cannot: unmapped spans, kernels < 5.4, no libc).

        Called from the compute thread after a layer ran while the model does not fit in memory.
        Without it, the kernel's LRU sees the used layer's pages as referenced twice (read, then
        computed on) and the read-ahead of the next layers only once, and reclaims the read-ahead
        first: exactly the pages needed next.
        """
        if _libc is None or not self._cool:
            return 0
        total = 0
        for _, start, end, mapping in spans:
            if mapping is None:
                continue
            if _libc.madvise(*self._range(mapping, start, end), MADV_COLD) != 0:
                self._cool = False  # kernels < 5.4
                return total
            total += end - start
        return total

    def _range(self, mapping: mmap.mmap, start: int, end: int) -> tuple[int, int]:
        """(address, length) of a page-aligned byte range of the reader's mapping."""
        base = self._bases.get(id(mapping))
        if base is None:
            base = self._bases[id(mapping)] = _address(mapping)
        start -= start % mmap.PAGESIZE
        return base + start, min(end, len(mapping)) - start

    def _populate_range(self, mapping: mmap.mmap, start: int, end: int) -> bool:
        if _libc.madvise(*self._range(mapping, start, end), MADV_POPULATE_READ) == 0:
            return True
        self._populate = False  # EINVAL on kernels < 5.14: use pread from now on
        return False

    def _pread(self, path: str, start: int, end: int) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        offset, total = start, 0
        while offset < end:
            n = os.preadv(fd, [self._scratch[: min(CHUNK, end - offset)]], offset)
            if n <= 0:
                break
            offset += n
            total += n
        return total

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bases.clear()
