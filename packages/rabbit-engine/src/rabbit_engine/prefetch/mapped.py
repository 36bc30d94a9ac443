"""Local files in the run dtype, on the CPU: tensors are free views of the reader's maps.

Building a layer's tensors takes microseconds, so it happens in the compute thread (doing it in a
second thread would only contend for the GIL). Prefetching here means getting the layer's pages
into memory in time, and the used ones out of the way, while the model is not in the page cache.
"""

from __future__ import annotations

from rabbit_engine.prefetch.base import Prefetcher
from rabbit_engine.prefetch.pacing import PagePacer
from rabbit_engine.profiler import Profiler
from rabbit_engine.weights import WeightMap
from rabbit_store import LayerReader


class MappedPages(Prefetcher):
    """Page warming (populate read-ahead) and cooling, only while the previous pass hit the disk."""

    def __init__(self, weight_map: WeightMap, reader: LayerReader, profiler: Profiler) -> None:
        super().__init__(weight_map, reader, profiler)
        self._pacer = PagePacer(weight_map, reader)

    @property
    def in_flight(self) -> int:
        return 0  # read-ahead fills the page cache; no tensor is held before `acquire`

    def begin_pass(self) -> None:
        self._pacer.begin_pass()

    def prepare(self, gid: int) -> None:
        if self._pacer.cold and gid not in self._jobs:
            self._jobs[gid] = self._executor.submit(self._warm, gid)

    def acquire(self, gid: int) -> None:
        warming = self._jobs.pop(gid, None)
        if warming is not None:
            # Wait for the read-ahead rather than fault the same pages in forward order beside it:
            # under memory pressure the unreferenced read-ahead pages are reclaimed first and the
            # faults re-read them (measured under a 1.41 GiB cap: 1.84-2.01 s/token without the
            # wait, 1.56-1.64 s with it; see docs/performance.md).
            with self.profiler.section("wait"):
                warming.result()
        with self.profiler.section("read"):
            raw = self.reader.read(self.weight_map.groups[gid].keys)
        with self.profiler.section("convert"):
            tensors, _ = self.weight_map.materialize(gid, raw)
        self.weight_map.assign(gid, tensors, raw)

    def release(self, gid: int) -> None:
        self._pacer.cool(gid)
        self.weight_map.release(gid)

    def _warm(self, gid: int) -> None:
        with self.profiler.section("read"):
            self._pacer.warm(gid)

    def close(self) -> None:
        super().close()
        self._pacer.close()
