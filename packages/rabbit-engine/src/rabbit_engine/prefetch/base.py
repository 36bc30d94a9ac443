"""The interface between the streamer and a prefetch strategy (one per kind of storage)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rabbit_engine.profiler import Profiler
from rabbit_engine.weights import WeightMap
from rabbit_store import LayerReader


class Prefetcher(ABC):
    """How one kind of storage brings a streamed layer's weights in, and when it reads ahead.

    The streamer calls, for each streamed layer i of each forward pass: `acquire(i)` before it runs
    (its weights are in its modules when this returns), `prepare(j)` for the layers that run next,
    and `release(i)` after it ran; `begin_pass()` once before the pass's first streamed layer.
    A strategy owns the only thread that reads ahead (the reader reads in whatever thread calls it).
    A new kind of layer (quantized, say) is a new subclass, not a flag in an existing one.
    """

    def __init__(self, weight_map: WeightMap, reader: LayerReader, profiler: Profiler) -> None:
        self.weight_map = weight_map
        self.reader = reader
        self.profiler = profiler
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rabbit-prefetch")
        self._jobs: dict[int, Future[Any]] = {}  # layer -> its work ahead, not yet acquired

    @property
    def in_flight(self) -> int:
        """Layers read ahead whose tensors the pipeline holds (counted in `max_loaded`)."""
        return len(self._jobs)

    def begin_pass(self) -> None:  # noqa: B027 - most strategies need no per-pass decision
        """A forward pass starts (called before its first streamed layer)."""

    @abstractmethod
    def prepare(self, gid: int) -> None:
        """Start bringing layer `gid` in, in the background; it runs soon."""

    @abstractmethod
    def acquire(self, gid: int) -> None:
        """Put layer `gid`'s weights into its modules, now (waiting for `prepare`'s work)."""

    @abstractmethod
    def release(self, gid: int) -> None:
        """Layer `gid` ran: drop its weights (and whatever held them)."""

    def close(self) -> None:
        """Cancel work not started and wait for the rest; the strategy cannot be used afterwards."""
        for job in self._jobs.values():
            job.cancel()
        self._jobs.clear()
        self._executor.shutdown(wait=True)
