"""Layers whose fetching is real work, done ahead in the strategy's worker thread.

Remote reads, dtype casts (or alignment copies) and host -> GPU copies all release the GIL, so the
worker overlaps them with the compute thread, which only waits when a layer is not ready yet.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from rabbit_engine.pool import BufferPool
from rabbit_engine.prefetch.base import Prefetcher
from rabbit_engine.profiler import Profiler
from rabbit_engine.staging import CudaStager
from rabbit_engine.weights import WeightMap
from rabbit_store import LayerReader


class Fetched(NamedTuple):
    raw: dict[str, memoryview]  # the bytes read (kept for transformers' conversion path)
    tensors: dict[str, torch.Tensor]
    ready: Any  # the CUDA event the tensors are ready at, or None


class FetchAhead(Prefetcher):
    """Read (into pooled buffers when remote) and convert the next layers in the worker thread."""

    def __init__(
        self,
        weight_map: WeightMap,
        reader: LayerReader,
        profiler: Profiler,
        *,
        pool: BufferPool | None = None,
    ) -> None:
        super().__init__(weight_map, reader, profiler)
        # Remote storage: streamed layers are read into pooled buffers rather than fresh ones.
        self.pool = pool
        self._buffers: dict[int, bytearray] = {}  # layer -> the pooled buffer it occupies

    def prepare(self, gid: int) -> None:
        if gid in self._jobs:
            return
        if self.pool is None:  # local files (remote ones are read by the worker, not advised)
            # The kernel starts reading while the worker still converts earlier layers.
            self.reader.advise(self.weight_map.groups[gid].keys)
        self._jobs[gid] = self._executor.submit(self._fetch, gid)

    def acquire(self, gid: int) -> None:
        job = self._jobs.pop(gid, None)
        if job is None:
            fetched = self._fetch(gid)  # nothing ahead of the first streamed layer of a run
        else:
            with self.profiler.section("wait"):
                fetched = job.result()
        self._assign(gid, fetched)

    def release(self, gid: int) -> None:
        self.weight_map.release(gid)
        buffer = self._buffers.pop(gid, None)
        if buffer is not None:
            self.pool.release(buffer)

    def _fetch(self, gid: int) -> Fetched:
        keys = self.weight_map.groups[gid].keys
        with self.profiler.section("read"):
            if self.pool is not None:
                buffer = self._buffers[gid] = self.pool.acquire()
                raw = self.reader.read(keys, out=buffer)
            else:
                raw = self.reader.read(keys)
        with self.profiler.section("convert"):
            raw = self.weight_map.decode(raw)  # compressed tensors without a packed kernel
        return self._materialize(gid, raw)

    def _materialize(self, gid: int, raw: dict[str, memoryview]) -> Fetched:
        with self.profiler.section("convert"):
            tensors, _ = self.weight_map.materialize(gid, raw)
        return Fetched(raw, tensors, None)

    def _assign(self, gid: int, fetched: Fetched) -> None:
        self.weight_map.assign(gid, fetched.tensors, fetched.raw)


class CudaStaging(FetchAhead):
    """CUDA: each layer goes through the stager's pinned buffers and side stream."""

    def __init__(
        self,
        weight_map: WeightMap,
        reader: LayerReader,
        profiler: Profiler,
        *,
        stager: CudaStager,
        pool: BufferPool | None = None,
    ) -> None:
        super().__init__(weight_map, reader, profiler, pool=pool)
        self.stager = stager

    def _materialize(self, gid: int, raw: dict[str, memoryview]) -> Fetched:
        with self.profiler.section("copy"):
            tensors, ready = self.weight_map.materialize(gid, raw, self.stager)
        return Fetched(raw, tensors, ready)

    def _assign(self, gid: int, fetched: Fetched) -> None:
        if fetched.ready is not None:
            # The compute stream waits for the side-stream copy; the CPU does not.
            torch.cuda.current_stream(self.stager.device).wait_event(fetched.ready)
        super()._assign(gid, fetched)
