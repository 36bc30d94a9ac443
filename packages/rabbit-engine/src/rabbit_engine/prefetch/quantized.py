"""Compressed layers (`compression="8bit"|"4bit"`): read, dequantize what has no packed kernel,
and build the layer's tensors, all ahead in the worker thread; local pages paced as for bf16.

A layer whose linears all run packed costs the worker only views (and its pages, read ahead while
the model is cold); one with fused MoE experts, or a split packed for another CPU's int4 layout,
costs a dequantization or a repack, which is why it is done here and never on the compute thread.
"""

from __future__ import annotations

from rabbit_engine.pool import BufferPool
from rabbit_engine.prefetch.fetch import FetchAhead, Fetched
from rabbit_engine.prefetch.pacing import PagePacer
from rabbit_engine.profiler import Profiler
from rabbit_engine.weights import WeightMap
from rabbit_store import LayerReader


class QuantizedFetch(FetchAhead):
    """FetchAhead for compressed layers, with page warming and cooling for local files."""

    def __init__(
        self,
        weight_map: WeightMap,
        reader: LayerReader,
        profiler: Profiler,
        *,
        pool: BufferPool | None = None,
    ) -> None:
        super().__init__(weight_map, reader, profiler, pool=pool)
        # Remote files (a pool) have no pages to pace: the worker's read is the fetch.
        self._pacer = PagePacer(weight_map, reader) if pool is None else None

    def begin_pass(self) -> None:
        if self._pacer is not None:
            self._pacer.begin_pass()

    def prepare(self, gid: int) -> None:
        if gid not in self._jobs:
            self._jobs[gid] = self._executor.submit(self._fetch, gid)

    def release(self, gid: int) -> None:
        if self._pacer is not None:
            self._pacer.cool(gid)
        super().release(gid)

    def _fetch(self, gid: int) -> Fetched:
        if self._pacer is not None and self._pacer.cold:
            # Pages first, in file order, so that neither the views nor the compute thread fault.
            with self.profiler.section("read"):
                self._pacer.warm(gid)
        return super()._fetch(gid)

    def close(self) -> None:
        super().close()
        if self._pacer is not None:
            self._pacer.close()
