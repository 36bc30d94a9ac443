"""describe(): what a checkpoint holds, as a JSON-ready dict (the CLI's `inspect`, and
`rabbit`'s)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .index import CheckpointIndex
from .plan import LayerPlan
from .sources import Source, open_source


def describe(
    source: str | os.PathLike[str] | Source,
    *,
    revision: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    layer_prefix: str | None = None,
) -> dict[str, Any]:
    """Layers, tensors, dtypes, bytes and head tying of a checkpoint; reads headers only."""
    src = open_source(
        source, revision=revision, token=token, storage_options=storage_options, cache_dir=cache_dir
    )
    index = CheckpointIndex.load(src)
    plan = LayerPlan.from_index(index, layer_prefix)
    tensors = index.tensors
    return {
        "location": src.location,
        "fingerprint": index.fingerprint,
        "files": [{"name": f, "size": index.file_sizes[f]} for f in index.files],
        "num_tensors": len(tensors),
        "total_bytes": index.nbytes,
        "dtypes": dict(Counter(t.dtype for t in tensors.values())),
        "layer_prefix": plan.layer_prefix,
        "num_layers": plan.num_layers,
        "tied": plan.tied,
        "parts": {
            part: {"tensors": names, "bytes": plan.nbytes(names)}
            for part, names in (
                ("embeddings", plan.embeddings),
                ("norm", plan.norm),
                ("lm_head", plan.lm_head),
                ("other", plan.other),
            )
        },
        "layers": [
            {
                "index": i,
                "tensors": len(names),
                "bytes": plan.nbytes(names),
                "files": sorted({tensors[n].file for n in names}),
            }
            for i, names in enumerate(plan.layers)
        ],
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "file": t.file,
            }
            for t in tensors.values()
        ],
    }
