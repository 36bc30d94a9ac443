"""Compressed (8-bit / 4-bit) linear weights: scheme, packing, dequantization and compute.

Weights are packed once, at split time, into the layouts torch's CPU kernels take
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`); `quantized_linear` then runs on
them directly. Lazy like `rabbit_engine`: `scheme` is torch-free (a manifest or a bad
`compression=` is handled before torch is imported); the other modules import torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbit_engine.lazy import lazy_exports

if TYPE_CHECKING:
    from rabbit_engine.quant.compute import kernel_fits, quantized_linear, repack_int4
    from rabbit_engine.quant.dequant import dequantize, int4_codes
    from rabbit_engine.quant.int4_layout import current_int4_layout, unpack_int4_codes
    from rabbit_engine.quant.packing import INT8_LAYOUT, PackedWeight, quantize
    from rabbit_engine.quant.scheme import (
        COMPRESSION_CHOICES,
        DEFAULT_GROUP_SIZE,
        GROUP_SIZES,
        CompressionScheme,
        CompressionSchemeError,
        parse_compression,
    )

_EXPORTS = {
    "COMPRESSION_CHOICES": "scheme",
    "DEFAULT_GROUP_SIZE": "scheme",
    "GROUP_SIZES": "scheme",
    "CompressionScheme": "scheme",
    "CompressionSchemeError": "scheme",
    "parse_compression": "scheme",
    "INT8_LAYOUT": "packing",
    "PackedWeight": "packing",
    "quantize": "packing",
    "current_int4_layout": "int4_layout",
    "unpack_int4_codes": "int4_layout",
    "dequantize": "dequant",
    "int4_codes": "dequant",
    "kernel_fits": "compute",
    "quantized_linear": "compute",
    "repack_int4": "compute",
}

__all__ = [
    "COMPRESSION_CHOICES",
    "CompressionScheme",
    "CompressionSchemeError",
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "INT8_LAYOUT",
    "PackedWeight",
    "current_int4_layout",
    "dequantize",
    "int4_codes",
    "kernel_fits",
    "parse_compression",
    "quantize",
    "quantized_linear",
    "repack_int4",
    "unpack_int4_codes",
]


__getattr__, __dir__ = lazy_exports(
    __name__, {name: f"{__name__}.{module}" for name, module in _EXPORTS.items()}
)
