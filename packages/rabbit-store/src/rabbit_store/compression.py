"""The compression scheme: what a compressed split records and what the packing functions obey.

Torch-free on purpose: a split's manifest is read (and a bad `compression=` refused) before torch
is imported. The scheme is a plain frozen value; `to_dict()/from_dict()` is the manifest's stable
spelling of it, versioned so a later format is refused by name instead of misread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidCheckpointError, InvalidOptionError
from .safetensors_header import DTYPE_BITS

__all__ = [
    "COMPRESSION_CHOICES",
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "MODES",
    "SCALE_DTYPES",
    "SCHEME_VERSION",
    "CompressedTensor",
    "CompressionRecord",
    "CompressionScheme",
    "CompressionSchemeError",
    "packed_names",
    "parse_compression",
]

SCHEME_VERSION = 1

# Spellings accepted for `compression=` -> bits. "8bit"/"4bit" are the earlier engine's keyword.
COMPRESSION_CHOICES: dict[str, int] = {"8bit": 8, "int8": 8, "4bit": 4, "int4": 4}

# The group sizes torch's CPU int4 kernel accepts (`_weight_int4pack_mm_for_cpu` checks qGroupSize
# in {32, 64, 128, 256}); a group is a run of input features sharing one scale and zero point.
GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)

# Measured by tools/rabbit_bench/quality.py on SmolLM2-135M over GPL-3 (4096 tokens): 4bit-g32
# +0.20% perplexity, g64 +36%, g128 not applicable (576 input features); 32 is the only size
# within the issue's +10%, and it divides every hidden size we stream. (That model comes from a
# Q4_1 GGUF whose 32-wide grid g32 reproduces, which flatters g32; recheck on a bf16 release.)
DEFAULT_GROUP_SIZE = 32

# Scale (and zero point) dtypes: the kernels compute in the activation dtype and want the scales
# in that same dtype, so a scheme's scale dtype should be the run dtype.
SCALE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")

_METHODS = {8: "int8-channelwise-symmetric", 4: "int4-groupwise-asymmetric"}
_FIELDS = ("version", "method", "bits", "group_size", "scale_dtype")


class CompressionSchemeError(InvalidCheckpointError):
    """A recorded compression scheme this version cannot read (unknown field, version or value).

    `field` names the manifest field at fault.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CompressionScheme:
    """How the streamed decoder layers' linear weights are stored.

    8-bit: symmetric int8, one scale per output channel (`group_size` None).
    4-bit: asymmetric 0..15 codes, one scale and zero point per `group_size` input features.
    """

    bits: int
    group_size: int | None = None
    scale_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.bits not in _METHODS:
            raise InvalidOptionError(
                f"compression bits must be 8 or 4, got {self.bits!r}", option="compression"
            )
        if self.bits == 8 and self.group_size is not None:
            raise InvalidOptionError(
                f"8-bit compression uses one scale per output channel; group_size must be None, "
                f"got {self.group_size!r}",
                option="group_size",
            )
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise InvalidOptionError(
                f"4-bit group_size must be one of {', '.join(map(str, GROUP_SIZES))} "
                f"(the sizes torch's int4 kernel accepts), got {self.group_size!r}",
                option="group_size",
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise InvalidOptionError(
                f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}",
                option="scale_dtype",
            )

    @property
    def method(self) -> str:
        return _METHODS[self.bits]

    @property
    def name(self) -> str:
        """Short human spelling, e.g. '8bit' or '4bit-g64'."""
        return "8bit" if self.bits == 8 else f"4bit-g{self.group_size}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's spelling; `from_dict` reads back exactly this."""
        return {
            "version": SCHEME_VERSION,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionScheme:
        """Read a manifest's scheme, refusing anything this version does not know by field name."""
        if not isinstance(data, dict):
            raise CompressionSchemeError(
                f"compression scheme must be a JSON object, got {type(data).__name__}",
                field="compression",
            )
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise CompressionSchemeError(
                f"compression scheme has unknown field {unknown[0]!r} (this version knows "
                f"{', '.join(_FIELDS)}); the split was written by a newer RabbitLLM",
                field=unknown[0],
            )
        for name in _FIELDS:
            if name not in data:
                raise CompressionSchemeError(f"compression scheme lacks field {name!r}", field=name)
        if data["version"] != SCHEME_VERSION:
            raise CompressionSchemeError(
                f"compression scheme version {data['version']!r} is not supported (this version "
                f"reads {SCHEME_VERSION}); rewrite the split with this RabbitLLM",
                field="version",
            )
        try:
            scheme = cls(
                bits=data["bits"], group_size=data["group_size"], scale_dtype=data["scale_dtype"]
            )
        except InvalidOptionError as exc:
            field = "bits" if exc.option == "compression" else (exc.option or "compression")
            raise CompressionSchemeError(f"compression scheme: {exc}", field=field) from exc
        if data["method"] != scheme.method:
            raise CompressionSchemeError(
                f"compression scheme method {data['method']!r} does not match {scheme.bits} bits "
                f"(expected {scheme.method!r})",
                field="method",
            )
        return scheme


def parse_compression(
    value: str | CompressionScheme,
    *,
    group_size: int | None = None,
    scale_dtype: str = "bfloat16",
) -> CompressionScheme:
    """`compression="8bit"|"int8"|"4bit"|"int4"` (any case) as a scheme.

    `group_size` applies to 4-bit only (default `DEFAULT_GROUP_SIZE`).
    """
    if isinstance(value, CompressionScheme):
        return value
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in COMPRESSION_CHOICES:
        raise InvalidOptionError(
            f"compression must be one of {', '.join(map(repr, COMPRESSION_CHOICES))}, "
            f"got {value!r}",
            option="compression",
        )
    bits = COMPRESSION_CHOICES[key]
    if bits == 4 and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    return CompressionScheme(bits=bits, group_size=group_size, scale_dtype=scale_dtype)


# --- what a compressed split records ----------------------------------------------------------

#: How the engine restores a compressed tensor when a layer is loaded:
#: "linear": the weight of an nn.Linear, run by torch's packed kernels;
#: "dequant": any other weight (fused MoE expert stacks, per-expert tensors transformers combines
#: at load), dequantized to its original dtype in the prefetch thread when the layer is loaded.
MODES: tuple[str, ...] = ("linear", "dequant")

_RECORD_FIELDS = ("scheme", "layout", "tensors")
_TENSOR_FIELDS = ("dtype", "shape", "mode")
_PACKED_SUFFIXES = (".qweight", ".scales")


def packed_names(key: str) -> tuple[str, str]:
    """The two tensors a compressed checkpoint tensor `key` is stored as in a split: the codes and
    the scales, named after the module (a trailing ".weight" dropped) so they sit beside it."""
    stem = key.removesuffix(".weight")
    return stem + _PACKED_SUFFIXES[0], stem + _PACKED_SUFFIXES[1]


@dataclass(frozen=True)
class CompressedTensor:
    """What one compressed checkpoint tensor was before packing, and how the engine restores it.

    `dtype` is the original's safetensors dtype (e.g. "BF16"): the dtype "dequant" restores and
    the one an original-size estimate counts.
    """

    dtype: str
    shape: tuple[int, ...]
    mode: str

    @property
    def nbytes(self) -> int:
        """Bytes of the original (uncompressed) tensor."""
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "mode": self.mode}


@dataclass(frozen=True)
class CompressionRecord:
    """A split's `compression` manifest field: the scheme, the packed layout the bytes are in
    (e.g. "int8:nk", "int4pack_cpu:AVX512": a loader whose kernels want another layout repacks or
    refuses by this name) and every compressed tensor, keyed by its ORIGINAL checkpoint key."""

    scheme: CompressionScheme
    layout: str
    tensors: dict[str, CompressedTensor]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's spelling; `from_dict` reads back exactly this."""
        return {
            "scheme": self.scheme.to_dict(),
            "layout": self.layout,
            "tensors": {key: t.to_dict() for key, t in self.tensors.items()},
        }

    def packed(self) -> dict[str, str]:
        """Every packed tensor name in the split -> the original key it belongs to."""
        return {name: key for key in self.tensors for name in packed_names(key)}

    @property
    def original_nbytes(self) -> int:
        """Bytes the compressed tensors took before compression."""
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> CompressionRecord:
        """Read a manifest's `compression`, refusing anything malformed or unknown.

        Every refusal is a CompressionSchemeError whose message names `where` (the manifest) and
        whose `field` names the field at fault, e.g. "scheme.version" or "tensors[<key>].mode":
        a split written by a newer RabbitLLM is refused by name instead of misread.
        """

        def refuse(message: str, field: str) -> CompressionSchemeError:
            return CompressionSchemeError(
                f"{where}: compression field {field!r}: {message}; split the checkpoint again "
                "with this RabbitLLM",
                field=field,
            )

        if not isinstance(data, dict):
            raise refuse(f"must be a JSON object, got {type(data).__name__}", "compression")
        unknown = sorted(set(data) - set(_RECORD_FIELDS))
        if unknown:
            raise refuse(
                f"unknown (this version knows {', '.join(_RECORD_FIELDS)}; written by a newer "
                "RabbitLLM?)",
                unknown[0],
            )
        for name in _RECORD_FIELDS:
            if name not in data:
                raise refuse("missing", name)
        try:
            scheme = CompressionScheme.from_dict(data["scheme"])
        except CompressionSchemeError as exc:
            field = "scheme" if exc.field == "compression" else f"scheme.{exc.field}"
            raise refuse(str(exc), field) from None
        layout = data["layout"]
        if not isinstance(layout, str) or not layout:
            raise refuse(f"must be a non-empty string, got {layout!r}", "layout")
        raw_tensors = data["tensors"]
        if not isinstance(raw_tensors, dict) or not raw_tensors:
            raise refuse("must be a non-empty JSON object (key -> tensor)", "tensors")
        tensors = {
            key: _tensor_from_dict(value, f"tensors[{key}]", refuse)
            for key, value in raw_tensors.items()
        }
        record = cls(scheme=scheme, layout=layout, tensors=tensors)
        packed = record.packed()
        if len(packed) != 2 * len(tensors):
            seen: set[str] = set()
            for key in tensors:
                names = set(packed_names(key))
                if names & seen:
                    raise refuse(
                        "its packed names collide with another tensor's", f"tensors[{key}]"
                    )
                seen |= names
        clash = sorted(set(packed) & set(tensors))
        if clash:
            raise refuse("is both compressed and a packed name", f"tensors[{clash[0]}]")
        return record


def _tensor_from_dict(
    value: Any, field: str, refuse: Callable[[str, str], CompressionSchemeError]
) -> CompressedTensor:
    """One entry of CompressionRecord.tensors; `refuse(message, field)` builds the error."""
    if not isinstance(value, dict):
        raise refuse(f"must be a JSON object, got {type(value).__name__}", field)
    unknown = sorted(set(value) - set(_TENSOR_FIELDS))
    if unknown:
        raise refuse(
            f"unknown (this version knows {', '.join(_TENSOR_FIELDS)})", field + "." + unknown[0]
        )
    for name in _TENSOR_FIELDS:
        if name not in value:
            raise refuse("missing", f"{field}.{name}")
    dtype, shape, mode = value["dtype"], value["shape"], value["mode"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise refuse(f"unknown safetensors dtype {dtype!r}", f"{field}.dtype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise refuse(f"must be a list of non-negative integers, got {shape!r}", f"{field}.shape")
    if mode not in MODES:
        raise refuse(
            f"unknown mode {mode!r} (this version knows {', '.join(MODES)})", f"{field}.mode"
        )
    return CompressedTensor(dtype=dtype, shape=tuple(shape), mode=mode)
