"""The streaming loop: bring a decoder layer's weights in just before it runs, drop them after.

Hooks on transformers' own decoder layers are the only seam: the forward pass, masks, positions and
the KV cache stay transformers'. The per-token path is `_before` and `_after` below; how a layer's
weights come in, and what is read ahead while layer i computes, is the prefetch strategy's
(`rabbit_engine.prefetch`), chosen once at load for the kind of storage. Nothing is
garbage-collected or trimmed per layer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from rabbit_engine.prefetch import Prefetcher, choose_prefetcher
from rabbit_engine.profiler import Profiler
from rabbit_engine.staging import CudaStager
from rabbit_engine.weights import RESIDENT, WeightMap
from rabbit_store import LayerReader

logger = logging.getLogger(__name__)


class LayerStreamer:
    """Owns the hooks and which layers hold real weights; the prefetcher does the loading."""

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
        self.max_loaded = 0  # the most decoder layers that held real weights at once
        # Streamed passes so far: what speculative decoding and batching divide tokens by.
        self.passes = 0
        self.prefetcher: Prefetcher = choose_prefetcher(
            weight_map, reader, profiler, prefetch=self.prefetch, stager=stager
        )
        logger.debug("Prefetching with %s", type(self.prefetcher).__name__)
        streamed = [i for i in range(self.num_layers) if i not in self.resident_layers]
        self._first_streamed = streamed[0] if streamed else -1
        self._ahead = {i: self._next_streamed(streamed, n) for n, i in enumerate(streamed)}
        self._loaded: set[int] = set()
        self._handles = []
        for i in streamed:
            self._handles.append(
                layers[i].register_forward_pre_hook(functools.partial(self._before, i))
            )
            self._handles.append(layers[i].register_forward_hook(functools.partial(self._after, i)))

    def _next_streamed(self, streamed: list[int], n: int) -> list[int]:
        """The `prefetch` streamed layers that run after `streamed[n]`, wrapping into the next pass
        (resident layers skipped: after the last layer the first *streamed* one is next)."""
        count = min(self.prefetch, len(streamed) - 1)
        return [streamed[(n + d) % len(streamed)] for d in range(1, count + 1)]

    def load_resident(self) -> None:
        """Read the resident parts and resident layers once, in memory we own for the model's life.

        Plain synchronous reads: resident groups can be larger than a streamed layer, so they use
        neither the pooled buffers nor the CUDA stager.
        """
        gids = (RESIDENT, *sorted(self.resident_layers))
        for gid in gids:
            with self.profiler.section("read"):
                raw = self.reader.read(self.weight_map.groups[gid].keys)
            with self.profiler.section("convert"):
                raw = self.weight_map.decode(raw)
                tensors, _ = self.weight_map.materialize(gid, raw)
                self.weight_map.assign(gid, tensors, raw)
        with self.profiler.section("convert"):
            self.weight_map.own(gids, self.reader)

    # ---- the per-token path ------------------------------------------------------------------
    def _before(self, i: int, module: torch.nn.Module, args: Any) -> None:
        if i == self._first_streamed:
            self.passes += 1
            self.prefetcher.begin_pass()
        self.prefetcher.acquire(i)
        self._loaded.add(i)
        for j in self._ahead[i]:
            if j not in self._loaded:
                self.prefetcher.prepare(j)
        self.max_loaded = max(self.max_loaded, len(self._loaded) + self.prefetcher.in_flight)

    def _after(self, i: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.prefetcher.release(i)
        self._loaded.discard(i)

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.prefetcher.close()
        self.reader.close()
