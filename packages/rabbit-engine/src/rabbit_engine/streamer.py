"""The streaming loop: bring a decoder layer's weights in just before it runs, drop them after.

Hooks on transformers' own decoder layers are the only seam: the forward pass, masks, positions and
the KV cache stay transformers'. While layer i computes, layers i+1..i+k are brought in: by one
background thread (read, cast, copy to the GPU) when that is real work, or, for local files in the
run dtype, by reading the next layers' byte ranges into the page cache in that thread while the
model is not cached (the tensors themselves are free views of the mapped file).
Nothing is garbage-collected or trimmed per layer.
"""

from __future__ import annotations

import functools
import logging
import mmap
import resource
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from rabbit_engine.pool import BufferPool
from rabbit_engine.profiler import Profiler
from rabbit_engine.readahead import PageWarmer
from rabbit_engine.staging import CudaStager
from rabbit_engine.weights import RESIDENT, WeightMap
from rabbit_store import LayerReader

logger = logging.getLogger(__name__)


class LayerStreamer:
    """Owns the hooks, the prefetch thread and which layers hold real weights."""

    def __init__(
        self,
        weight_map: WeightMap,
        reader: LayerReader,
        layers: Sequence[torch.nn.Module],
        *,
        resident_layers: set[int],
        prefetch: int,
        profiler: Profiler,
        stager: CudaStager | None = None,
    ) -> None:
        self.weight_map = weight_map
        self.reader = reader
        self.num_layers = len(layers)
        self.resident_layers = set(resident_layers)
        self.prefetch = max(0, min(prefetch, self.num_layers - 1))
        self.profiler = profiler
        self.stager = stager
        self._pending: dict[int, Future] = {}
        self._buffers: dict[
            int, bytearray
        ] = {}  # remote layers: the pooled buffer each one occupies
        self._pool: BufferPool | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rabbit-prefetch")
        self._handles = []
        self.max_loaded = 0  # the most decoder layers that held real weights at once
        self._advised: set[int] = set()  # layers being read ahead and not yet run
        self._warmer = PageWarmer()
        self._warming: dict[int, Future] = {}  # layer -> its read-ahead, waited for before it runs
        self._spans: dict[int, list[tuple[str, int, int, mmap.mmap | None]] | None] = {}
        self._cold = True  # until a pass that read nothing from disk says the files are cached
        self._io = (
            -1
        )  # disk reads so far (major faults + input blocks); -1: read ahead on the first pass
        self._first_streamed = min(
            (i for i in range(self.num_layers) if i not in self.resident_layers), default=-1
        )
        self._casts = weight_map.align or any(  # a copy per layer: worth the background thread
            slot.src_dtype != slot.dtype
            for gid, g in weight_map.groups.items()
            if gid != RESIDENT
            for slot in g.slots
        )
        self._loaded: set[int] = set()
        for i, layer in enumerate(layers):
            if i in self.resident_layers:
                continue
            self._handles.append(
                layer.register_forward_pre_hook(functools.partial(self._before, i))
            )
            self._handles.append(layer.register_forward_hook(functools.partial(self._after, i)))

    # ---- loading -----------------------------------------------------------------------------
    def _fetch(self, gid: int, streamed: bool = True) -> tuple[Any, dict[str, torch.Tensor], Any]:
        """Read and convert a group. Streamed layers use the pooled buffers and the CUDA stager;
        resident ones (kept for the model's life, possibly larger than a layer) use neither."""
        keys = self.weight_map.groups[gid].keys
        with self.profiler.section("read"):
            if self._pool is not None and streamed:
                buffer = self._buffers[gid] = self._pool.acquire()
                raw = self.reader.read(keys, out=buffer)
            else:
                raw = self.reader.read(keys)
        with self.profiler.section("copy" if self.stager is not None else "convert"):
            tensors, ready = self.weight_map.materialize(
                gid, raw, self.stager if streamed else None
            )
        return raw, tensors, ready

    def _assign(self, gid: int, fetched: tuple[Any, dict[str, torch.Tensor], Any]) -> None:
        raw, tensors, ready = fetched
        if ready is not None:  # the compute stream waits for the side-stream copy, the CPU does not
            torch.cuda.current_stream(self.stager.device).wait_event(ready)
        self.weight_map.assign(gid, tensors, raw)

    def load_now(self, gid: int) -> None:
        # Resident parts can be larger than a staging buffer: plain synchronous copies.
        fetched = self._fetch(gid, streamed=False)
        self._assign(gid, fetched)
        self._own(gid, fetched[0])

    def load_resident(self) -> None:
        keys = self.weight_map.groups[RESIDENT].keys
        raw = self.reader.read(keys)
        if raw and not any(isinstance(view.obj, mmap.mmap) for view in raw.values()):
            # Remote storage: read streamed layers into pooled buffers rather than fresh ones.
            largest = max(self.weight_map.nbytes(i) for i in range(self.num_layers))
            self._pool = BufferPool(largest, count=self.prefetch + 2)
        with self.profiler.section("convert"):
            tensors, _ = self.weight_map.materialize(RESIDENT, raw)
        self.weight_map.assign(RESIDENT, tensors, raw)
        self._own(RESIDENT, raw)
        for i in sorted(self.resident_layers):
            self.load_now(i)

    def _own(self, gid: int, raw: Any) -> None:
        """Copy a resident group's CPU weights out of the mapped files into memory we own.

        A view over a mapped file is only as resident as the page cache lets it be: once the
        streamed layers fill memory (a model larger than RAM, or a memory cap), the kernel evicts
        the head and embeddings like any other file page and the compute thread re-reads them every
        token, in page faults nothing overlaps (measured under a 1.41 GiB cap: ~170 MiB per token
        faulted in by compute for a 262 MB head + embeddings). Anonymous copies stay; they are what
        the memory budget counted anyway. Tied parameters stay tied (one copy per source tensor).
        """
        if not raw or not any(isinstance(view.obj, mmap.mmap) for view in raw.values()):
            return  # remote reads already own their memory (CUDA tensors are skipped below)
        copies: dict[int, torch.nn.Parameter | torch.Tensor] = {}
        originals = []  # alive until every holder is swapped, so their ids stay unique
        with self.profiler.section("convert"):
            for module, attr, _ in self.weight_map.groups[gid].targets.values():
                old = getattr(module, attr)
                if old.is_meta or old.device.type != "cpu" or id(old) in copies:
                    continue
                originals.append(old)
                data = old.detach().clone()
                copies[id(old)] = (
                    torch.nn.Parameter(data, requires_grad=False)
                    if isinstance(old, torch.nn.Parameter)
                    else data
                )
            # Every holder of a copied tensor (a tied head is not among the group's targets)
            for module in self.weight_map.model.modules():
                for table in (module._parameters, module._buffers):
                    for name, value in table.items():
                        if value is not None and id(value) in copies:
                            table[name] = copies[id(value)]
        del originals
        # The file pages just copied no longer need to be mapped (nor counted in our RSS).
        spans = []
        for key in self.weight_map.groups[gid].keys:
            info = self.weight_map.index.tensors[key]
            mapping = self.reader.mapping(info.file)
            spans.append((info.file, info.offset, info.offset + info.nbytes, mapping))
        self._warmer.unmap(spans)

    @property
    def _convert_ahead(self) -> bool:
        """Whether fetching a layer is real work worth a background thread.

        Remote reads, CUDA copies and dtype casts are (they release the GIL). A local mmap in the run
        dtype is not: its tensors are views made in microseconds, and doing that in a second thread
        only contends for the GIL with the compute thread. There, the kernel does the prefetching
        (the reader's madvise WILLNEED on the next layers' byte ranges).
        """
        return self._pool is not None or self.stager is not None or self._casts

    def _next_streamed(self, i: int) -> list[int]:
        """The `prefetch` streamed layers that run after layer i, wrapping into the next pass
        (resident layers skipped: after the last layer the first *streamed* one is next)."""
        ahead = []
        for d in range(1, self.num_layers):
            j = (i + d) % self.num_layers
            if j not in self.resident_layers:
                if j == i or len(ahead) == self.prefetch:
                    break
                ahead.append(j)
        return ahead

    def _schedule_after(self, i: int) -> None:
        for j in self._next_streamed(i):
            if j in self._pending or j in self._loaded or j in self._advised:
                continue
            if self._convert_ahead:
                self.reader.prefetch(self.weight_map.groups[j].keys)
                self._pending[j] = self._executor.submit(self._fetch, j)
            elif self._cold:
                spans = self._local_spans(j)
                if spans is None:
                    self.reader.prefetch(self.weight_map.groups[j].keys)
                else:
                    self._warming[j] = self._executor.submit(self._warm, j, spans)
                self._advised.add(j)

    def _local_spans(self, gid: int) -> list[tuple[str, int, int, mmap.mmap | None]] | None:
        """The byte span of each local file a group reads from, or None if any file is remote.
        Computed once per group: it is asked for twice per layer and pass while the model is cold."""
        if gid in self._spans:
            return self._spans[gid]
        spans: dict[str, list[int]] = {}
        for key in self.weight_map.groups[gid].keys:
            info = self.weight_map.index.tensors[key]
            span = spans.setdefault(info.file, [info.offset, info.offset + info.nbytes])
            span[0], span[1] = min(span[0], info.offset), max(span[1], info.offset + info.nbytes)
        out: list[tuple[str, int, int, mmap.mmap | None]] | None = []
        for file, (start, end) in spans.items():
            path = self.reader.source.local_path(file)
            if path is None:
                out = None
                break
            out.append((path, start, end, self.reader.mapping(file)))
        self._spans[gid] = out
        return out

    def _warm(self, gid: int, spans: list[tuple[str, int, int, mmap.mmap | None]]) -> None:
        with self.profiler.section("read"):
            self._warmer.warm(spans)

    def _step_started(self) -> None:
        """Decide, once per forward pass, whether local layers need reading ahead.

        Reading ahead pages that are already cached is pure overhead (a warm decode step of a small
        model lost 10% to it). Disk reads in the previous pass (major page faults, or blocks our
        own read-ahead took from the device) are the cheap signal that the model is not all cached.
        """
        usage = resource.getrusage(resource.RUSAGE_SELF)
        io = usage.ru_majflt + usage.ru_inblock
        self._cold = io > self._io
        self._io = io

    # ---- hooks -------------------------------------------------------------------------------
    def _before(self, i: int, module: torch.nn.Module, args: Any) -> None:
        if i == self._first_streamed:
            self._step_started()
        self._advised.discard(i)
        warming = self._warming.pop(i, None)
        if warming is not None:
            # Wait for the read-ahead rather than fault the same pages in forward order beside it:
            # under memory pressure the unreferenced read-ahead pages are reclaimed first and the
            # faults re-read them (measured under a 1.41 GiB cap: 1.84-2.01 s/token without the
            # wait, 1.56-1.64 s with it; see docs/performance.md).
            with self.profiler.section("wait"):
                warming.result()
        future = self._pending.pop(i, None)
        if future is None:
            fetched = self._fetch(i)
        else:
            with self.profiler.section("wait"):
                fetched = future.result()
        self._assign(i, fetched)
        self._loaded.add(i)
        self._schedule_after(i)
        self.max_loaded = max(self.max_loaded, len(self._loaded) + len(self._pending))

    def _after(self, i: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._cold and not self._convert_ahead:
            # The layer just used is the next pass's last need: put its pages first in line for
            # reclaim, ahead of the read-ahead of the next layers (measured under a 1.41 GiB cap:
            # otherwise the compute thread faults 60-85 MiB per token back in, read-ahead that
            # reclaim took before use; with it, none).
            spans = self._local_spans(i)
            if spans is not None:
                self._warmer.cool(spans)
        self.weight_map.release(i)
        self._loaded.discard(i)
        buffer = self._buffers.pop(i, None)
        if buffer is not None:
            self._pool.release(buffer)

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for future in (*self._pending.values(), *self._warming.values()):
            future.cancel()
        self._pending.clear()
        self._warming.clear()
        self._executor.shutdown(wait=True)
        self._warmer.close()
        self.reader.close()
