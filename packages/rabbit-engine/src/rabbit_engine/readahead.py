"""Bringing a layer's bytes into the page cache ahead of use, for local files.

`madvise(WILLNEED)` is only a hint: measured under a memory cap, the compute thread still took most
of the major page faults itself. Plain `pread` calls in a background thread are not a hint: they read
the range at full sequential bandwidth (and release the GIL while they wait), so by the time the
layer runs its pages are cached and the compute thread only maps them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CHUNK = 8 << 20  # bytes per pread: large sequential requests, one reusable scratch buffer


class PageWarmer:
    """Used from one thread (the prefetch thread)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._scratch = memoryview(bytearray(CHUNK))

    def warm(self, spans: Iterable[tuple[str, int, int]]) -> int:
        """Read `(path, start, end)` ranges and discard the bytes; returns the bytes read."""
        total = 0
        for path, start, end in spans:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            offset = start
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
