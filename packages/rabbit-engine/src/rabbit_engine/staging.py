"""Host -> GPU transfer of one layer at a time, overlapped with compute.

Each layer's tensors are packed into a pinned host buffer from a small pool (pageable memory cannot
be copied asynchronously), copied to the GPU in one `non_blocking` transfer on a side stream, and
the compute stream waits on an event before the layer runs. Buffers are reused; nothing is allocated
per layer on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_ALIGN = (
    256  # each tensor view starts on a 256-byte boundary (any dtype's alignment; coalesced loads)
)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class StagedLayer:
    tensors: dict[str, torch.Tensor]
    ready: torch.cuda.Event


class CudaStager:
    """A ring of pinned host buffers and one side stream for a device."""

    def __init__(self, device: torch.device, max_layer_bytes: int, slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        capacity = _aligned(max_layer_bytes) + _ALIGN * 64
        self._buffers = [
            torch.empty(capacity, dtype=torch.uint8, pin_memory=True) for _ in range(max(slots, 1))
        ]
        self._in_flight: list[torch.cuda.Event | None] = [None] * len(self._buffers)
        self._next = 0

    def stage(
        self,
        items: Sequence[tuple[str, memoryview, torch.dtype, tuple[int, ...], torch.dtype]],
    ) -> StagedLayer:
        """Pack `(key, bytes, src dtype, shape, run dtype)` items, copy them to the GPU, cast
        there."""
        slot = self._next
        self._next = (self._next + 1) % len(self._buffers)
        if self._in_flight[slot] is not None:
            self._in_flight[slot].synchronize()  # the copy that last used this buffer has finished
        pinned = self._buffers[slot]
        offsets = []
        offset = 0
        for _, buf, _, _, _ in items:
            n = len(buf)
            if n:
                pinned[offset : offset + n].copy_(torch.frombuffer(buf, dtype=torch.uint8))
            offsets.append(offset)
            offset = _aligned(offset + n)
        tensors: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self.stream):
            block = torch.empty(offset, dtype=torch.uint8, device=self.device)
            block.copy_(pinned[:offset], non_blocking=True)
            for (key, buf, src_dtype, shape, dtype), start in zip(items, offsets, strict=True):
                n = len(buf)
                tensor = block[start : start + n].view(src_dtype).view(shape)
                if dtype != src_dtype:
                    tensor = tensor.to(dtype)
                tensors[key] = tensor
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self._in_flight[slot] = ready
        # The compute stream will use these; tell the caching allocator so it does not recycle the
        # block while compute kernels are still queued.
        compute = torch.cuda.current_stream(self.device)
        block.record_stream(compute)
        for t in tensors.values():
            t.record_stream(compute)
        return StagedLayer(tensors, ready)
