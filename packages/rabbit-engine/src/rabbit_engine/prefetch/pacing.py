"""Page pacing for local files: read a layer's pages in ahead of use, and let the used ones go,
only while the model is not all in the page cache. Shared by the strategies that stream local
files (`MappedPages`, `QuantizedFetch`)."""

from __future__ import annotations

import resource

from rabbit_engine.readahead import MappedSpan, PageWarmer, mapped_spans
from rabbit_engine.weights import WeightMap
from rabbit_store import LayerReader


class PagePacer:
    """Warming (populate read-ahead, in the prefetch thread) and cooling (compute thread)."""

    def __init__(self, weight_map: WeightMap, reader: LayerReader) -> None:
        self.weight_map = weight_map
        self.reader = reader
        self._warmer = PageWarmer()
        self._spans: dict[int, list[MappedSpan]] = {}
        self.cold = True  # until a pass that read nothing from disk says the files are cached
        self._io = -1  # disk reads so far (major faults + input blocks); -1: read ahead at first

    def begin_pass(self) -> None:
        """Decide, once per forward pass, whether local layers need reading ahead.

        Reading ahead pages that are already cached is pure overhead (a warm decode step of a small
        model lost 10% to it). Disk reads in the previous pass (major page faults, or blocks our
        own read-ahead took from the device) are the cheap signal that the model is not all cached.
        """
        usage = resource.getrusage(resource.RUSAGE_SELF)
        io = usage.ru_majflt + usage.ru_inblock
        self.cold = io > self._io
        self._io = io

    def warm(self, gid: int) -> None:
        """Read layer `gid`'s pages in (blocking: call it in the prefetch thread)."""
        self._warmer.warm(self._spans_of(gid))

    def cool(self, gid: int) -> None:
        """The layer just used is the next pass's last need: put its pages first in line for
        reclaim, ahead of the read-ahead of the next layers (measured under a 1.41 GiB cap:
        otherwise the compute thread faults 60-85 MiB per token back in, read-ahead that reclaim
        took before use; with it, none)."""
        if self.cold:
            self._warmer.cool(self._spans_of(gid))

    def _spans_of(self, gid: int) -> list[MappedSpan]:
        """The byte span of each file the layer reads from, with its local path and map.
        Computed once per layer: asked for twice per layer and pass while the model is cold."""
        spans = self._spans.get(gid)
        if spans is None:
            keys = self.weight_map.groups[gid].keys
            spans = self._spans[gid] = mapped_spans(self.reader, self.reader.spans(keys))
        return spans

    def close(self) -> None:
        self._warmer.close()
