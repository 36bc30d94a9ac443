"""What each file of a split holds and in what order: names, tensor order, source runs, header.

Pure functions of the index: nothing here reads or writes a byte of tensor data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..index import CheckpointIndex
from ..safetensors_header import TensorInfo, build_header

#: Files copied next to the layers so that the split is a loadable checkpoint (top level only).
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "*processor_config.json",
)
#: Page size that copied bytes keep their offset modulo (see file_header).
PAGE = 4096


def layer_file_name(part: str, layer: int | None) -> str:
    """File name of one part of the model in a split: `layer-00012.safetensors`,
    `norm.safetensors`."""
    return f"layer-{layer:05d}.safetensors" if part == "layer" else f"{part}.safetensors"


def output_order(infos: Sequence[TensorInfo]) -> list[TensorInfo]:
    """Widest dtype first (as the safetensors writer does, so every tensor stays aligned),
    checkpoint order within a dtype width (so runs of neighbouring source bytes stay together)."""
    return sorted(infos, key=lambda t: -t.alignment)


def source_runs(infos: Sequence[TensorInfo]) -> list[tuple[str, int, int]]:
    """(file, start, end) source ranges in output order, neighbours that touch merged."""
    runs: list[list[Any]] = []
    for info in infos:
        if runs and runs[-1][0] == info.file and runs[-1][2] == info.offset:
            runs[-1][2] = info.end
        else:
            runs.append([info.file, info.offset, info.end])
    return [(f, s, e) for f, s, e in runs]


def file_header(index: CheckpointIndex, infos: list[TensorInfo]) -> bytes:
    """The split file's header, padded so that the largest source run keeps its page offset
    (the kernel then copies whole pages, and the copy's pages line up with the source's)."""
    fmt = index.file_metadata.get(infos[0].file, {}).get("format", "pt")
    position, best = 0, (-1, 0)  # (run length, source offset - offset within the data section)
    for _, start, end in source_runs(infos):
        best = max(best, (end - start, start - position))
        position += end - start
    return build_header(infos, {"format": fmt}, data_start=(PAGE, best[1] % PAGE))
