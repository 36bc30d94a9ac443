"""Prefetch strategies, one per kind of storage, behind one small interface (`Prefetcher`).

- `MappedPages`: local files in the run dtype on the CPU (free views; page warming and cooling).
- `FetchAhead`: remote files (pooled buffers) or layers that need a cast, converted ahead.
- `CudaStaging`: layers copied to the GPU through the stager, ahead.
- `QuantizedFetch`: compressed layers (8-bit/4-bit), built (and dequantized where no packed kernel
  runs them) ahead, with local pages paced as `MappedPages` does.

`choose_prefetcher` picks one once, at load, from what the reader says about the files.
"""

from __future__ import annotations

from rabbit_engine.pool import BufferPool
from rabbit_engine.prefetch.base import Prefetcher
from rabbit_engine.prefetch.fetch import CudaStaging, FetchAhead
from rabbit_engine.prefetch.mapped import MappedPages
from rabbit_engine.prefetch.quantized import QuantizedFetch
from rabbit_engine.profiler import Profiler
from rabbit_engine.staging import CudaStager
from rabbit_engine.weights import RESIDENT, WeightMap
from rabbit_store import LayerReader

__all__ = [
    "CudaStaging",
    "FetchAhead",
    "MappedPages",
    "Prefetcher",
    "QuantizedFetch",
    "choose_prefetcher",
]


def choose_prefetcher(
    weight_map: WeightMap,
    reader: LayerReader,
    profiler: Profiler,
    *,
    prefetch: int,
    stager: CudaStager | None = None,
) -> Prefetcher:
    """The strategy for this model's storage and run.

    Fetching a layer ahead in a second thread pays when it is real work: remote reads, CUDA copies
    and dtype casts are (they release the GIL). A local mmap in the run dtype is not: its tensors
    are views made in microseconds, and making them in a second thread only contends for the GIL
    with the compute thread; there the work ahead is bringing the pages in (`MappedPages`).
    """
    pool = None
    if not _local(weight_map, reader):
        # Remote storage: read streamed layers into pooled buffers rather than fresh ones.
        layers = [gid for gid in weight_map.groups if gid != RESIDENT]
        largest = max((weight_map.nbytes(gid) for gid in layers), default=0)
        pool = BufferPool(largest, count=prefetch + 2)
    if stager is not None:
        return CudaStaging(weight_map, reader, profiler, stager=stager, pool=pool)
    if weight_map.compressed is not None:
        return QuantizedFetch(weight_map, reader, profiler, pool=pool)
    if pool is not None or _casts(weight_map):
        return FetchAhead(weight_map, reader, profiler, pool=pool)
    return MappedPages(weight_map, reader, profiler)


def _local(weight_map: WeightMap, reader: LayerReader) -> bool:
    """Whether the checkpoint is read through local maps; every file of a source is the same kind,
    so the files the resident parts read (mapped at load anyway) answer for all of them."""
    for group in sorted(weight_map.groups.values(), key=lambda g: g.gid):
        if group.keys:
            return reader.is_local(weight_map.index.tensors[group.keys[0]].file)
    return True


def _casts(weight_map: WeightMap) -> bool:
    """A copy per layer (a dtype cast, or an alignment copy with `align`)."""
    return weight_map.align or any(
        slot.src_dtype != slot.dtype
        for gid, group in weight_map.groups.items()
        if gid != RESIDENT
        for slot in group.slots
    )
