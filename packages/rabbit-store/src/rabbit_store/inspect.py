"""describe(): what a checkpoint holds, as a JSON-ready dict (the CLI's `inspect`, and
`rabbit`'s); for a compressed split also its scheme and what the compression saved."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .index import CheckpointIndex
from .manifest import Manifest
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
    """Layers, tensors, dtypes, bytes and head tying of a checkpoint; reads headers only.

    `compression` is None unless the checkpoint is a compressed split (see `compression_summary`).
    """
    src = open_source(
        source, revision=revision, token=token, storage_options=storage_options, cache_dir=cache_dir
    )
    index = CheckpointIndex.load(src)
    plan = LayerPlan.from_index(index, layer_prefix)
    tensors = index.tensors
    manifest = index.manifest
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
        "compression": None if manifest is None else compression_summary(index, manifest),
    }


def compression_summary(index: CheckpointIndex, manifest: Manifest) -> dict[str, Any] | None:
    """A compressed split's scheme, how many tensors are compressed, each layer file's bytes (from
    the manifest), and the tensor bytes against what the same tensors took uncompressed."""
    record = manifest.compression_record()
    if record is None:
        return None
    packed = record.packed()
    kept = sum(t.nbytes for name, t in index.tensors.items() if name not in packed)
    scheme = record.scheme
    return {
        "scheme": scheme.name,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "scale_dtype": scheme.scale_dtype,
        "layout": record.layout,
        "compressed_tensors": len(record.tensors),
        "modes": dict(Counter(t.mode for t in record.tensors.values())),
        "layer_files": [
            {"name": f.name, "layer": f.layer, "bytes": f.size}
            for f in sorted(manifest.files, key=lambda f: f.layer or 0)
            if f.part == "layer"
        ],
        "bytes": index.nbytes,
        "original_bytes": record.original_nbytes + kept,
    }
