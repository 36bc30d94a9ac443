"""The memory budget: what stays resident and what streams.

Embeddings, norm and head are always resident (every token needs them); then as many decoder layers
as fit beside the streaming working set (the layer computing, the ones being prefetched and the one
just used).
"""

from __future__ import annotations

import logging

import torch

from rabbit_engine.cgroup import ram_facts
from rabbit_engine.errors import MemoryBudgetError
from rabbit_engine.options import MaxMemory
from rabbit_engine.weights import RESIDENT, WeightMap

logger = logging.getLogger(__name__)

AUTO_HEADROOM = 0.15  # leave this share of free memory for activations, the KV cache and the OS
_GIB = 2**30


def resolve_budget(max_memory: MaxMemory, device: torch.device) -> int | None:
    """`None` = stream every layer; "auto" = free RAM (or VRAM) minus a headroom; else bytes.

    `max_memory` comes parsed (`StreamingOptions`). Free RAM is the smaller of the machine's and
    what this process's memory cgroup still allows (a container's limit): planning from the host's
    figure inside a container gets the process killed.
    """
    if max_memory is None or isinstance(max_memory, int):
        return max_memory
    if max_memory == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            where = f"free memory of {device}"
        else:
            ram = ram_facts()
            free = ram.available
            where = (
                "what this process's memory cgroup still allows"
                if ram.bound_by_cgroup
                else "available RAM"
            )
        budget = int(free * (1 - AUTO_HEADROOM))
        logger.info(
            "max_memory='auto': %.2f GiB (%.0f%% of %s, %.2f GiB)",
            budget / _GIB,
            100 * (1 - AUTO_HEADROOM),
            where,
            free / _GIB,
        )
        return budget
    raise TypeError(f"max_memory={max_memory!r} was not parsed: build StreamingOptions first.")


def plan_residency(
    weight_map: WeightMap, num_layers: int, budget: int | None, prefetch: int
) -> set[int]:
    """Pick the decoder layers kept resident; raise if not even one layer can stream."""
    if budget is None:
        return set()
    fixed = weight_map.loaded_nbytes(RESIDENT)
    sizes = [weight_map.loaded_nbytes(i) for i in range(num_layers)]
    if fixed + sum(sizes) <= budget:
        logger.info(
            "Memory budget %.2f GiB holds the whole model (%.2f GiB): every layer stays resident.",
            budget / _GIB,
            (fixed + sum(sizes)) / _GIB,
        )
        return set(range(num_layers))
    # The layer computing, the ones read ahead, and the one just used (its pages are reclaimed
    # lazily): planning one layer fewer made the compute thread fault ~85 MiB per token back in
    # under a memory cap (measured, tools/rabbit_bench cold regime, rabbit-auto).
    working = (2 + prefetch) * max(sizes, default=0)
    needed = fixed + max(sizes, default=0)
    if budget < needed:
        raise MemoryBudgetError(
            f"max_memory={budget / _GIB:.2f} GiB cannot hold the resident parts "
            f"({fixed / _GIB:.2f} GiB) plus one decoder layer ({max(sizes) / _GIB:.2f} GiB): "
            f"at least {needed / _GIB:.2f} GiB is needed."
        )
    room = budget - fixed - working
    resident: set[int] = set()
    for i, size in enumerate(sizes):
        if size > room:
            break
        resident.add(i)
        room -= size
    logger.info(
        "Resident: embeddings/norm/head (%.2f GiB) and %d of %d decoder layers; the rest stream.",
        fixed / _GIB,
        len(resident),
        num_layers,
    )
    return resident
