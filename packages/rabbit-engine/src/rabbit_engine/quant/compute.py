"""`quantized_linear`: y = x W^T (+ bias) straight from a packed weight, on torch's CPU kernels.

The kernels take 2-D activations whose last dimension is contiguous, and want the scales in the
activation's dtype: x is flattened to [M, in] and, when the stored scale dtype is not x's, both
are computed in fp32 (both casts exact), so the result never depends on a lossy cast. A scheme
whose scale dtype is the run dtype (the engine's choice) pays no cast at all.

Where no kernel fits (a CUDA tensor, a float64 activation, or a 4-bit weight packed on a CPU with
another layout), the fallback multiplies by `dequantize(packed)`. That costs a full dequantization
per call: the engine must not take this path on the compute thread, but dequantize (or
`repack_int4`) in its background thread instead; the function is here for tests and tools.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rabbit_engine.quant.dequant import dequantize, int4_codes
from rabbit_engine.quant.int4_layout import current_int4_layout, pack_int4_codes
from rabbit_engine.quant.packing import PackedWeight

__all__ = ["kernel_fits", "quantized_linear", "repack_int4"]

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_fits(packed: PackedWeight, x: torch.Tensor) -> bool:
    """Whether `quantized_linear(x, packed)` runs on torch's CPU kernel (else: dequantize)."""
    return (
        packed.num_experts is None
        and x.device.type == "cpu"
        and packed.qweight.device.type == "cpu"
        and x.dtype in _KERNEL_DTYPES
        and (packed.scheme.bits == 8 or packed.layout == current_int4_layout())
    )


def quantized_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, W, bias)` for x of shape [..., in] with W the packed 2-D weight."""
    if packed.num_experts is not None:
        raise ValueError(
            f"quantized_linear takes a 2-D packed weight; got an expert stack of shape "
            f"{packed.shape} (use packed.expert(e))"
        )
    if x.shape[-1] != packed.in_features:
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not fit a packed weight of shape "
            f"{packed.shape} (last dimension must be {packed.in_features})"
        )
    if not kernel_fits(packed, x):
        logger.debug("no kernel for %s on %s %s: dequantizing", packed.layout, x.device, x.dtype)
        return F.linear(x, dequantize(packed, dtype=x.dtype, device=x.device), bias)
    lead = x.shape[:-1]
    compute = x.dtype if packed.scales.dtype == x.dtype else torch.float32
    x2 = x.reshape(-1, packed.in_features).to(compute)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    scales = packed.scales.to(compute)
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, packed.out_features)
    elif packed.scheme.bits == 8:
        qweight = packed.qweight
        if compute == torch.bfloat16:
            operands = _bf16_int8_operands(x2, qweight)
            if operands is None:  # exact casts; fp32's kernel is ~12x slower, but this is rare
                x2, scales = x2.to(torch.float32), scales.to(torch.float32)
            else:
                x2, qweight = operands
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, packed.qweight, packed.scheme.group_size, scales
        )
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*lead, packed.out_features)


def _bf16_int8_operands(
    x2: torch.Tensor, qweight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x2, qweight) as torch's bf16 int8 kernel can take them, copied where misaligned; None
    where it cannot run at all.

    Measured on torch 2.13 (AVX512): `_weight_int8pack_mm` in bfloat16 returns wrong numbers for
    in_features not a multiple of 16 (and segfaults from 4 rows of x on), and segfaults when an
    activation row does not start on 32 bytes or, from 4 rows of x on, when a weight row does not
    start on 16 bytes; fp32 and fp16 take any shape and alignment. A split's packed tensors sit
    wherever the safetensors layout puts them (often 8 bytes off). The copies are fresh (64-byte
    aligned) allocations: the activation is small, and the weight is copied only for a prompt
    (4+ rows), where the copy costs ~1x the kernel at 16 rows while running the fp32 kernel
    instead would cost ~35x (2048x5632, one thread).
    """
    if x2.shape[1] % 16:
        return None
    if x2.data_ptr() % 32 or (x2.shape[0] > 1 and x2.stride(0) % 16):
        x2 = x2.clone(memory_format=torch.contiguous_format)
    if x2.shape[0] >= 4 and qweight.data_ptr() % 16:
        qweight = qweight.clone()
    return x2, qweight


def repack_int4(packed: PackedWeight) -> PackedWeight:
    """A 4-bit weight in this CPU's kernel layout (unchanged if it already is).

    For a split written on a CPU with another ATen capability (AVX512 vs AVX2); done once per
    layer load, in the background thread.
    """
    if packed.scheme.bits != 4 or packed.layout == current_int4_layout():
        return packed
    if packed.num_experts is not None:
        parts = [repack_int4(packed.expert(e)) for e in range(packed.num_experts)]
        qweight = torch.stack([p.qweight for p in parts])
        return PackedWeight(packed.scheme, packed.shape, qweight, packed.scales, parts[0].layout)
    qweight, layout = pack_int4_codes(int4_codes(packed))
    return PackedWeight(packed.scheme, packed.shape, qweight, packed.scales, layout)
