"""Packed weight -> the float weight the kernel effectively multiplies by.

Two uses: the test oracle (transformers' own model loaded with these "fake-quantized" weights must
match RabbitLLM's compressed streaming), and the fallback where no kernel fits a device or dtype.
The engine runs the fallback in its background thread, never on the compute thread.

The result is computed in fp32, as the kernels do (int8: q * scale is exact in fp32; int4:
(code - 8) * scale + zero); casting it to bf16 rounds it, so a bf16 fake-quantized model differs
from the kernel's weights by that rounding (up to 2^-9 relative per weight).
"""

from __future__ import annotations

import torch

from rabbit_engine.quant.int4_layout import unpack_int4_codes
from rabbit_engine.quant.packing import PackedWeight

__all__ = ["dequantize", "int4_codes"]


def dequantize(
    packed: PackedWeight,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The float weight of `packed.shape` (2-D or a 3-D expert stack), in `dtype` on `device`."""
    if packed.scheme.bits == 8 and packed.scales.dtype == dtype and dtype != torch.float32:
        # q (8 bits) * scale (8 or 11 bits) is exact in fp32 and torch's bf16/fp16 multiply rounds
        # the fp32 product once: the same result as the fp32 path cast down, in half the passes.
        out = packed.qweight.cpu().to(dtype) * packed.scales.cpu()[..., None]
    elif packed.num_experts is not None:
        out = torch.stack([_dequantize_2d(packed.expert(e)) for e in range(packed.num_experts)])
    else:
        out = _dequantize_2d(packed)
    return out.to(device=device, dtype=dtype)


def int4_codes(packed: PackedWeight) -> torch.Tensor:
    """A 2-D 4-bit weight's codes (0..15) as uint8 [out, in], whatever layout it was packed in."""
    return unpack_int4_codes(packed.qweight.cpu(), packed.layout)


def _dequantize_2d(packed: PackedWeight) -> torch.Tensor:
    scales = packed.scales.cpu().to(torch.float32)
    if packed.scheme.bits == 8:
        return packed.qweight.cpu().to(torch.float32) * scales[:, None]
    n, k = packed.shape
    g = packed.scheme.group_size
    codes = int4_codes(packed).to(torch.float32).view(n, k // g, g)
    scale = scales[..., 0].t()[..., None]
    zero = scales[..., 1].t()[..., None]
    return ((codes - 8) * scale + zero).view(n, k)
