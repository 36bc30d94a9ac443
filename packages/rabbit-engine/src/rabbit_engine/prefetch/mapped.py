"""Local files in the run dtype, on the CPU: tensors are free views of the reader's maps.

Building a layer's tensors takes microseconds, so it happens in the compute thread (doing it in a
second thread would only contend for the GIL). Prefetching here means getting the layer's pages
into memory in time, and the used ones out of the way, while the model is not in the page cache.
"""

from __future__ import annotations

import resource

from rabbit_engine.prefetch.base import Prefetcher
from rabbit_engine.profiler import Profiler
from rabbit_engine.readahead import MappedSpan, PageWarmer, mapped_spans
from rabbit_engine.weights import WeightMap
from rabbit_store import LayerReader


class MappedPages(Prefetcher):
    """Page warming (populate read-ahead) and cooling, only while the previous pass hit the disk."""

    def __init__(self, weight_map: WeightMap, reader: LayerReader, profiler: Profiler) -> None:
        super().__init__(weight_map, reader, profiler)
        self._warmer = PageWarmer()
        self._spans: dict[int, list[MappedSpan]] = {}
        self._cold = True  # until a pass that read nothing from disk says the files are cached
        self._io = -1  # disk reads so far (major faults + input blocks); -1: read ahead at first

    @property
    def in_flight(self) -> int:
        return 0  # read-ahead fills the page cache; no tensor is held before `acquire`

    def begin_pass(self) -> None:
        """Decide, once per forward pass, whether local layers need reading ahead.

        Reading ahead pages that are already cached is pure overhead (a warm decode step of a small
        model lost 10% to it). Disk reads in the previous pass (major page faults, or blocks our
        own read-ahead took from the device) are the cheap signal that the model is not all cached.
        """
        usage = resource.getrusage(resource.RUSAGE_SELF)
        io = usage.ru_majflt + usage.ru_inblock
        self._cold = io > self._io
        self._io = io

    def prepare(self, gid: int) -> None:
        if self._cold and gid not in self._jobs:
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
        if self._cold:
            # The layer just used is the next pass's last need: put its pages first in line for
            # reclaim, ahead of the read-ahead of the next layers (measured under a 1.41 GiB cap:
            # otherwise the compute thread faults 60-85 MiB per token back in, read-ahead that
            # reclaim took before use; with it, none).
            self._warmer.cool(self._spans_of(gid))
        self.weight_map.release(gid)

    def _warm(self, gid: int) -> None:
        with self.profiler.section("read"):
            self._warmer.warm(self._spans_of(gid))

    def _spans_of(self, gid: int) -> list[MappedSpan]:
        """The byte span of each file the layer reads from, with its local path and map.
        Computed once per layer: asked for twice per layer and pass while the model is cold."""
        spans = self._spans.get(gid)
        if spans is None:
            keys = self.weight_map.groups[gid].keys
            spans = self._spans[gid] = mapped_spans(self.reader, self.reader.spans(keys))
        return spans

    def close(self) -> None:
        super().close()
        self._warmer.close()
