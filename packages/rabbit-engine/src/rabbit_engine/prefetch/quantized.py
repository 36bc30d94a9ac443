"""Compressed layers (`compression="8bit"|"4bit"`): read, dequantize what has no packed kernel,
and build the layer's tensors, all ahead in the worker thread; local pages paced as for bf16.

A layer whose linears all run packed costs the worker only views (and its pages, read ahead while
the model is cold); one with fused MoE experts, or a split packed for another CPU's int4 layout,
costs a dequantization or a repack, which is why it is done here and never on the compute thread.
"""

from __future__ import annotations

from concurrent.futures import Future

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
        self._rewarm: dict[int, Future[None]] = {}  # layers fetched last pass, read in again

    def begin_pass(self) -> None:
        if self._pacer is None:
            return
        self._pacer.begin_pass()
        if self._pacer.cold:
            # The first layers of this pass were fetched ahead at the end of the last one; if the
            # disk was read since, their pages may be gone again (reclaimed under a memory cap, or
            # evicted between steps): read them in again here, in the worker, rather than let the
            # compute thread fault them in (measured with per-step eviction: 52-84 MiB of faults
            # per token in the compute thread, without this).
            for gid in list(self._jobs):
                self._rewarm[gid] = self._executor.submit(self._warm, gid)

    def prepare(self, gid: int) -> None:
        if gid not in self._jobs:
            self._jobs[gid] = self._executor.submit(self._fetch, gid)

    def acquire(self, gid: int) -> None:
        rewarm = self._rewarm.pop(gid, None)
        if rewarm is not None:
            with self.profiler.section("wait"):
                rewarm.result()
        super().acquire(gid)

    def release(self, gid: int) -> None:
        if self._pacer is not None:
            self._pacer.cool(gid)
        super().release(gid)

    def _fetch(self, gid: int) -> Fetched:
        if self._pacer is not None and self._pacer.cold:
            # Pages first, in file order, so that neither the views nor the compute thread fault.
            self._warm(gid)
        return super()._fetch(gid)

    def _warm(self, gid: int) -> None:
        with self.profiler.section("read"):
            self._pacer.warm(gid)

    def close(self) -> None:
        for job in self._rewarm.values():
            job.cancel()
        self._rewarm.clear()
        super().close()
        if self._pacer is not None:
            self._pacer.close()
