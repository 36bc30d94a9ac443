"""Compressed (8-bit / 4-bit) linear weights: scheme, packing, dequantization and compute.

Weights are packed once, at split time (`compress_checkpoint`), into the layouts torch's CPU
kernels take (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`); `quantized_linear`
then runs on them directly. Lazy like `rabbit_engine`: the scheme lives in the torch-free
`rabbit_store.compression` (a manifest or a bad `compression=` is handled before torch is
imported); the other modules import torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbit_engine.lazy import lazy_exports

if TYPE_CHECKING:
    from rabbit_engine.quant.compute import kernel_fits, quantized_linear, repack_int4
    from rabbit_engine.quant.dequant import dequantize, int4_codes
    from rabbit_engine.quant.int4_layout import (
        current_int4_layout,
        pack_int4_codes_as,
        unpack_int4_codes,
    )
    from rabbit_engine.quant.linear import CompressedLinear
    from rabbit_engine.quant.packing import INT8_LAYOUT, PackedWeight, quantize
    from rabbit_engine.quant.writer import compress_checkpoint
    from rabbit_store.compression import (
        COMPRESSION_CHOICES,
        DEFAULT_GROUP_SIZE,
        GROUP_SIZES,
        CompressionScheme,
        CompressionSchemeError,
        parse_compression,
    )

_EXPORTS = {
    "COMPRESSION_CHOICES": "rabbit_store.compression",
    "DEFAULT_GROUP_SIZE": "rabbit_store.compression",
    "GROUP_SIZES": "rabbit_store.compression",
    "CompressionScheme": "rabbit_store.compression",
    "CompressionSchemeError": "rabbit_store.compression",
    "parse_compression": "rabbit_store.compression",
    "INT8_LAYOUT": f"{__name__}.packing",
    "PackedWeight": f"{__name__}.packing",
    "quantize": f"{__name__}.packing",
    "current_int4_layout": f"{__name__}.int4_layout",
    "pack_int4_codes_as": f"{__name__}.int4_layout",
    "unpack_int4_codes": f"{__name__}.int4_layout",
    "dequantize": f"{__name__}.dequant",
    "int4_codes": f"{__name__}.dequant",
    "kernel_fits": f"{__name__}.compute",
    "quantized_linear": f"{__name__}.compute",
    "repack_int4": f"{__name__}.compute",
    "CompressedLinear": f"{__name__}.linear",
    "compress_checkpoint": f"{__name__}.writer",
}

__all__ = [
    "COMPRESSION_CHOICES",
    "CompressedLinear",
    "CompressionScheme",
    "CompressionSchemeError",
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "INT8_LAYOUT",
    "PackedWeight",
    "compress_checkpoint",
    "current_int4_layout",
    "dequantize",
    "int4_codes",
    "kernel_fits",
    "pack_int4_codes_as",
    "parse_compression",
    "quantize",
    "quantized_linear",
    "repack_int4",
    "unpack_int4_codes",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
