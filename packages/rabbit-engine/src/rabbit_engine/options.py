"""Parsing of the user-facing options (`device`, `dtype`, `max_memory`) into torch values.

Kept in one place so every entry point (Python API, CLI) gives the same error for the same bad value.
"""

from __future__ import annotations

import re

import torch

from rabbit_engine.errors import InvalidOptionError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

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

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """`None` and "auto" mean: the checkpoint's own dtype (decided by the caller)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise InvalidOptionError(
            f"dtype={value!r} is not a supported dtype; use one of {sorted(set(_DTYPES))} or 'auto'."
        )
    return _DTYPES[key]


def parse_device(value: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when present, else CPU; anything else must be a device torch can use here."""
    if value is None or value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidOptionError(
            f"device={value!r} is not a torch device ({exc}); use 'cpu' or 'cuda[:N]'."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidOptionError(
                f"device={value!r} asks for CUDA, but torch sees no CUDA device here."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidOptionError(
                f"device={value!r}: only {torch.cuda.device_count()} CUDA device(s) are visible."
            )
    elif device.type not in ("cpu", "mps", "xpu"):
        raise InvalidOptionError(f"device={value!r} is not supported; use 'cpu' or 'cuda[:N]'.")
    return device


def parse_bytes(value: int | float | str, *, option: str = "max_memory") -> int:
    """Accept bytes as an int or strings like "6GiB", "500MB", "1.5 GB"."""
    if isinstance(value, bool):
        raise InvalidOptionError(
            f"{option}={value!r} is not a size; use bytes or a string like '6GiB'."
        )
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InvalidOptionError(f"{option}={value!r} must be positive.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InvalidOptionError(
            f"{option}={value!r} is not a size; use bytes, 'auto', or a string like '6GiB', '500MB'."
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidOptionError(f"{option}={value!r} must be positive.")
    return size
