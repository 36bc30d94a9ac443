"""The runtime options of a streaming model, parsed and validated in one place.

`StreamingOptions` is the one spelling of what `from_pretrained` accepts beyond where the weights
live (device, dtype, attention, memory budget, prefetch depth, profiling, bit-exactness). The
facade, the CLI and the bench all build one and pass it on, so the same bad value gets the same
error everywhere, and a new option is added here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rabbit_engine.errors import InvalidOptionError
from rabbit_store.compression import CompressionScheme, parse_compression

if TYPE_CHECKING:  # torch is imported where a value is parsed: the CLI builds its flags without it
    import torch

#: Layers read ahead of the one computing. Depths 1-6 measured within noise of each other on the
#: bench's cold regime (docs/performance.md); 2 keeps the working set small.
DEFAULT_PREFETCH = 2

#: The attention kernels transformers offers that we choose among, in order of preference.
IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")
#: What `attn_implementation` may be: "auto" picks flash_attention_2 when it works, else sdpa.
ATTN_CHOICES = ("auto", *IMPLEMENTATIONS)

#: A parsed `max_memory`: bytes, "auto" (decided at load from free memory), or None (stream all).
MaxMemory = int | Literal["auto"] | None

# Spellings users write -> torch dtype attribute names (resolved when parsed, torch imported then).
_DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
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
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise InvalidOptionError(
            f"dtype={value!r} is not a supported dtype; "
            f"use one of {sorted(set(_DTYPES))} or 'auto'.",
            option="dtype",
        )
    return getattr(torch, _DTYPES[key])


def parse_device(value: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when present, else CPU; anything else must be a device usable here."""
    import torch

    if value is None or value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidOptionError(
            f"device={value!r} is not a torch device ({exc}); use 'cpu' or 'cuda[:N]'.",
            option="device",
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidOptionError(
                f"device={value!r} asks for CUDA, but torch sees no CUDA device here.",
                option="device",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidOptionError(
                f"device={value!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.",
                option="device",
            )
    elif device.type not in ("cpu", "mps", "xpu"):
        raise InvalidOptionError(
            f"device={value!r} is not supported; use 'cpu' or 'cuda[:N]'.", option="device"
        )
    return device


def parse_bytes(value: int | float | str, *, option: str = "max_memory") -> int:
    """Accept bytes as an int or strings like "6GiB", "500MB", "1.5 GB"."""
    if isinstance(value, bool):
        raise InvalidOptionError(
            f"{option}={value!r} is not a size; use bytes or a string like '6GiB'.", option=option
        )
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InvalidOptionError(f"{option}={value!r} must be positive.", option=option)
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InvalidOptionError(
            f"{option}={value!r} is not a size; "
            "use bytes, 'auto', or a string like '6GiB', '500MB'.",
            option=option,
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidOptionError(f"{option}={value!r} must be positive.", option=option)
    return size


def parse_max_memory(value: int | float | str | None) -> MaxMemory:
    """`max_memory` as the engine uses it: None, "auto" (any case), or a positive byte count."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_bytes(value, option="max_memory")


def parse_prefetch(value: Any) -> int:
    """A count of layers (0 turns reading ahead off); bools and fractions are mistakes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOptionError(
            f"prefetch={value!r} must be a whole number of layers >= 0 "
            f"(default {DEFAULT_PREFETCH}).",
            option="prefetch",
        )
    return value


def parse_attn_implementation(value: str | None) -> str:
    if value is None:
        return "auto"
    if value not in ATTN_CHOICES:
        raise InvalidOptionError(
            f"attn_implementation={value!r} is not one of {', '.join(ATTN_CHOICES)}.",
            option="attn_implementation",
        )
    return value


def parse_compression_option(
    value: str | CompressionScheme | None, group_size: int | None
) -> CompressionScheme | None:
    """`compression` ("8bit"/"int8"/"4bit"/"int4", or a scheme) with its `group_size` (4-bit)."""
    if value is None:
        if group_size is not None:
            raise InvalidOptionError(
                f"group_size={group_size!r} applies to compression='4bit' only; "
                "no compression was asked for.",
                option="group_size",
            )
        return None
    if isinstance(group_size, bool) or (group_size is not None and not isinstance(group_size, int)):
        raise InvalidOptionError(
            f"group_size={group_size!r} must be a whole number of input features.",
            option="group_size",
        )
    return parse_compression(value, group_size=group_size)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{name}={value!r} must be True or False.", option=name)
    return value


@dataclass(frozen=True)
class StreamingOptions:
    """How a model streams, validated: build it with `StreamingOptions.create(**user_values)`.

    Field values are already parsed (a torch.device, a torch.dtype or None for the checkpoint's
    own, bytes or "auto"), so nothing downstream parses again.
    """

    device: torch.device = dataclasses.field(default_factory=lambda: parse_device(None))
    dtype: torch.dtype | None = None
    attn_implementation: str = "auto"
    max_memory: MaxMemory = None
    prefetch: int = DEFAULT_PREFETCH
    profile: bool = False
    bit_exact: bool = False
    #: Stream decoder layers compressed (8-bit or 4-bit weights). Its scale dtype is finalized at
    #: load to the run dtype (rabbit_engine.quant.writer.scheme_for).
    compression: CompressionScheme | None = None

    @classmethod
    def create(
        cls,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = "auto",
        max_memory: int | float | str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        profile: bool = False,
        bit_exact: bool = False,
        compression: str | CompressionScheme | None = None,
        group_size: int | None = None,
    ) -> StreamingOptions:
        """Parse the values a user writes; a bad one raises InvalidOptionError naming it."""
        return cls(
            device=parse_device(device),
            dtype=parse_dtype(dtype),
            attn_implementation=parse_attn_implementation(attn_implementation),
            max_memory=parse_max_memory(max_memory),
            prefetch=parse_prefetch(prefetch),
            profile=_flag("profile", profile),
            bit_exact=_flag("bit_exact", bit_exact),
            compression=parse_compression_option(compression, group_size),
        )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, as keywords of `from_pretrained` accept them."""
        return (*(f.name for f in dataclasses.fields(cls)), "group_size")

    @classmethod
    def from_kwargs(
        cls, kwargs: dict[str, Any], *, base: StreamingOptions | None = None
    ) -> StreamingOptions:
        """Take this class's options out of `kwargs` (what remains is not ours): `base` (or the
        defaults) with the given ones parsed over it."""
        given = {name: kwargs.pop(name) for name in cls.names() if name in kwargs}
        if base is None:
            return cls.create(**given)
        if not given:
            return base  # already parsed
        merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
        if "group_size" in given and "compression" not in given and base.compression is not None:
            merged["compression"] = f"{base.compression.bits}bit"  # re-parsed with the new size
        return cls.create(**{**merged, **given})
