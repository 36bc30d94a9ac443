"""safetensors' dtype names as torch dtypes, and the dtype a checkpoint was saved in."""

from __future__ import annotations

from collections import Counter

import torch

from rabbit_store import CheckpointIndex

# safetensors' dtype strings -> torch dtypes (the header spells them this way).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


#: torch dtype -> its safetensors name (the inverse of SAFETENSORS_DTYPES).
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes as a memoryview that keeps the tensor alive: the form
    read bytes take everywhere in the engine (what `torch.frombuffer` turns back into tensors)."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def checkpoint_dtype(index: CheckpointIndex) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes: the model's own dtype."""
    weights: Counter[str] = Counter()
    for info in index.tensors.values():
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
            weights[info.dtype] += info.nbytes
    return SAFETENSORS_DTYPES[weights.most_common(1)[0][0]] if weights else torch.float32
