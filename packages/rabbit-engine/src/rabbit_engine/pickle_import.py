"""Opt-in import of pickle checkpoints (`*.bin`, `*.pt`): converted once to safetensors, then
streamed.

Unpickling can run arbitrary code, so this only happens with `allow_pickle=True`, and even then only
through `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
The converted copy is what gets streamed: the engine itself reads safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file

from rabbit_store.constants import (
    INDEX_FILE,
    PICKLE_INDEX_FILE,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    TEMP_SUFFIX,
)
from rabbit_store.errors import InvalidCheckpointError

logger = logging.getLogger(__name__)

_COPIED = ("config.json", "generation_config.json")
_MARKER = ".rabbit-converted"


def pickle_files(source) -> list[str]:
    """The checkpoint's pickle weight files (from its index when it has one)."""
    if source.exists(PICKLE_INDEX_FILE):
        return sorted(set(source.read_json(PICKLE_INDEX_FILE)["weight_map"].values()))
    return sorted(n for n in source.list_files() if n.endswith(PICKLE_SUFFIXES) and "/" not in n)


def _load(path: str, name: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (
        Exception
    ) as exc:  # weights_only refuses code objects: never fall back to a full unpickle
        raise InvalidCheckpointError(
            f"{name}: torch.load(weights_only=True) refused or failed to read it "
            f"({type(exc).__name__}: {exc}). "
            "It may contain code; RabbitLLM never unpickles arbitrary objects."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidCheckpointError(f"{name}: not a state dict of tensors.")
    return state


def _unshare(
    state: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write, and {dropped name: kept name} for the tied ones.

    Tied weights (an LM head sharing the embedding) are one tensor under two names; safetensors
    refuses shared storage. As its own `save_model` does, every exact alias is written once under
    the first name in the state dict's order (the embedding, registered before the head) and the
    others are dropped, their names recorded in the file's metadata: the model ties them again
    when it loads (`tie_word_embeddings`), so nothing is read or held twice. Tensors that overlap
    without being the same view (slices of one fused buffer) are not ties: each gets a copy.
    """
    kept: dict[tuple, str] = {}
    spans: list[tuple[int, int, str]] = []  # (start, end, kept name) of each tensor written
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            raise InvalidCheckpointError(f"{name}: tensor {key!r} has no data (meta device).")
        start = tensor.data_ptr()
        view = (start, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if view in kept and tensor.numel() > 0:
            aliases[key] = kept[view]
            continue
        end = start + tensor.numel() * tensor.element_size()
        overlaps = tensor.numel() > 0 and any(s < end and start < e for s, e, _ in spans)
        tensors[key] = tensor.contiguous().clone() if overlaps else tensor.contiguous()
        kept[view] = key
        spans.append((start, end, key))
    if aliases:
        logger.info("%s: tied tensors written once: %s", name, aliases)
    return tensors, aliases


def convert_pickle_checkpoint(source, dest: Path) -> Path:
    """Write `dest` (a safetensors checkpoint) from `source`'s pickle files, once; returns
    `dest`."""
    dest = Path(dest)
    if (dest / _MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / _MARKER).exists():
            return dest
        work = Path(tempfile.mkdtemp(prefix=dest.name + ".", suffix=TEMP_SUFFIX, dir=dest.parent))
        try:
            weight_map: dict[str, str] = {}
            for name in pickle_files(source):
                path = source.local_path(name)
                if path is None:
                    path = str(work / ("download-" + os.path.basename(name)))
                    Path(path).write_bytes(source.read_bytes(name))
                tensors, aliases = _unshare(_load(path, name), name)
                out = Path(name).stem + SAFETENSORS_SUFFIX
                save_file(tensors, str(work / out), metadata={"format": "pt", **aliases})
                weight_map.update({key: out for key in tensors})
                if path.startswith(str(work)):
                    os.remove(path)
            (work / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            for name in _COPIED:
                if source.exists(name):
                    (work / name).write_bytes(source.read_bytes(name))
            (work / _MARKER).write_text("complete\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(work, dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    logger.info("Converted the pickle checkpoint %s to safetensors in %s", source.location, dest)
    return dest
