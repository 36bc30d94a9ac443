"""A bounded pool of reusable host buffers for layers read from remote storage.

Local files need none (tensors are views of the mmap); remote reads land in these buffers instead of
a fresh allocation per layer per token. The pool's size bounds the memory in flight: a reader that
finds every buffer taken waits until a layer is released.
"""

from __future__ import annotations

import queue


class BufferPool:
    """At most `count` buffers of `nbytes` each, made on demand and reused last-in first-out."""

    def __init__(self, nbytes: int, count: int) -> None:
        self.nbytes = nbytes
        self._free: queue.LifoQueue[bytearray] = queue.LifoQueue()
        self._count = count
        self._made = 0

    @property
    def allocated(self) -> int:
        """Buffers made so far: never more than `count`, however many layers were read."""
        return self._made

    def acquire(self) -> bytearray:
        """A free buffer; allocated lazily, so a pool that is never used costs nothing."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < self._count:
                self._made += 1
                return bytearray(self.nbytes)
            return self._free.get()

    def release(self, buffer: bytearray) -> None:
        self._free.put(buffer)
