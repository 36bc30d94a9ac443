"""Quantize float weights once (at split time) into the exact tensors torch's CPU kernels take.

Layouts (torch 2.13, checked by tests/engine/test_quant.py):

- 8-bit, `aten._weight_int8pack_mm(x[M, K], qweight[N, K] int8, scales[N]) -> [M, N]`:
  qweight is the plain row-major int8 weight (portable), scales one per output channel, in the
  activation's dtype (bf16, fp16 or fp32). Symmetric: w ~= q * scale, q in -127..127.
- 4-bit, `aten._weight_int4pack_mm_for_cpu(x[M, K], qweight, group_size, scales_and_zeros)`:
  qweight is `aten._convert_weight_to_int4pack_for_cpu(codes[N, K] int32, 1)`, uint8 [N, K/2] in a
  CPU-capability-specific order (see int4_layout); scales_and_zeros is [K/group, N, 2] in the
  activation's dtype, [..., 0] the scale and [..., 1] the zero point, and the kernel computes
  w = (code - 8) * scale + zero in fp32 (tinygemm's convention). N must be a multiple of 16 and
  group_size one of 32, 64, 128, 256.

All packed tensors are plain contiguous int8/uint8 and bf16/fp16/fp32 tensors, so safetensors
stores them as I8 / U8 and BF16 / F16 / F32. Packing is deterministic (no random rounding, no
threading-dependent reduction).

Fused MoE experts (transformers 5 keeps them as [experts, out, in] parameters) are packed expert by
expert with the same functions and stacked: qweight [E, ...], scales [E, ...]. `PackedWeight.expert`
gives one expert's 2-D view for a per-expert loop over the kernel; the streaming engine may instead
dequantize the stack in its background thread (`dequantize`) and run transformers' own expert code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rabbit_engine.errors import InvalidOptionError, WeightMismatchError
from rabbit_engine.quant.int4_layout import pack_int4_codes
from rabbit_store.compression import CompressionScheme

__all__ = ["INT8_LAYOUT", "PackedWeight", "fits_kernel_shape", "packed_specs", "quantize"]

INT8_LAYOUT = "int8:nk"

_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FLOAT_WEIGHTS = (torch.bfloat16, torch.float16, torch.float32)
# The int4 kernel handles output rows in blocks of 16, 32, 48 or 64.
_INT4_ROW_MULTIPLE = 16


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """One compressed weight: the kernel's tensors plus what is needed to read them back.

    `shape` is the float weight's shape, (out, in) or (experts, out, in). `layout` tags the byte
    order of `qweight` (INT8_LAYOUT, or an int4 layout naming the CPU capability it was packed on);
    a future manifest records it next to the scheme.
    """

    scheme: CompressionScheme
    shape: tuple[int, ...]
    qweight: torch.Tensor
    scales: torch.Tensor
    layout: str

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def num_experts(self) -> int | None:
        return self.shape[0] if len(self.shape) == 3 else None

    @property
    def nbytes(self) -> int:
        """Bytes stored (and streamed) for this weight."""
        return self.qweight.nbytes + self.scales.nbytes

    def expert(self, index: int) -> PackedWeight:
        """Expert `index` of a 3-D packed stack, as a 2-D packed weight (views, no copy)."""
        if self.num_experts is None:
            raise ValueError(f"packed weight of shape {self.shape} is not a 3-D expert stack")
        return PackedWeight(
            self.scheme, self.shape[1:], self.qweight[index], self.scales[index], self.layout
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store (safetensors-ready: contiguous, plain dtypes)."""
        return {"qweight": self.qweight, "scales": self.scales}

    @classmethod
    def from_tensors(
        cls,
        scheme: CompressionScheme,
        shape: tuple[int, ...],
        layout: str,
        tensors: dict[str, torch.Tensor],
        *,
        name: str = "weight",
    ) -> PackedWeight:
        """Rebuild from stored tensors, checking their shapes and dtypes against the scheme."""
        expected = packed_specs(scheme, tuple(shape))
        for key, (want_shape, want_dtype) in expected.items():
            tensor = tensors.get(key)
            if tensor is None:
                raise WeightMismatchError(f"compressed weight {name!r} lacks its {key!r} tensor")
            if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                raise WeightMismatchError(
                    f"compressed weight {name!r}: {key} is {tuple(tensor.shape)} "
                    f"{tensor.dtype}, expected {want_shape} {want_dtype} for a {scheme.name} "
                    f"weight of shape {tuple(shape)}"
                )
        return cls(scheme, tuple(shape), tensors["qweight"], tensors["scales"], layout)


def packed_specs(
    scheme: CompressionScheme, shape: tuple[int, ...]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each stored tensor of a weight of float `shape` (2-D or 3-D)."""
    lead, (n, k) = shape[:-2], shape[-2:]
    sdtype = _SCALE_DTYPES[scheme.scale_dtype]
    if scheme.bits == 8:
        return {"qweight": ((*lead, n, k), torch.int8), "scales": ((*lead, n), sdtype)}
    g = scheme.group_size or 0
    return {
        "qweight": ((*lead, n, k // 2), torch.uint8),
        "scales": ((*lead, k // g, n, 2), sdtype),
    }


def fits_kernel_shape(scheme: CompressionScheme, shape: tuple[int, ...]) -> bool:
    """Whether a weight of this float shape can be packed by `scheme` (`quantize` would accept it):
    4-bit needs in_features a multiple of the group size and out_features of 16."""
    if scheme.bits == 8:
        return True
    n, k = shape[-2:]
    return k % scheme.group_size == 0 and n % _INT4_ROW_MULTIPLE == 0


def quantize(
    weight: torch.Tensor, scheme: CompressionScheme, *, name: str = "weight"
) -> PackedWeight:
    """Quantize a [out, in] weight, or a [experts, out, in] stack expert by expert.

    `name` (the checkpoint tensor's name) is used in error messages.
    """
    shape = tuple(weight.shape)
    if weight.ndim not in (2, 3):
        raise ValueError(
            f"cannot quantize {name!r} of shape {shape}: expected [out, in] or [experts, out, in]"
        )
    if 0 in shape:
        raise ValueError(f"cannot quantize {name!r} of shape {shape}: it is empty")
    if weight.dtype not in _FLOAT_WEIGHTS:
        raise ValueError(
            f"cannot quantize {name!r} of dtype {weight.dtype}: expected bfloat16, float16 or "
            f"float32"
        )
    n, k = shape[-2:]
    if scheme.bits == 4:
        if k % scheme.group_size:
            raise InvalidOptionError(
                f"cannot quantize {name!r} of shape {shape} to 4 bits with group_size "
                f"{scheme.group_size}: in_features {k} is not a multiple of it (choose one of "
                f"the group sizes that divides {k})",
                option="group_size",
            )
        if n % _INT4_ROW_MULTIPLE:
            raise InvalidOptionError(
                f"cannot quantize {name!r} of shape {shape} to 4 bits: out_features {n} is not "
                f"a multiple of {_INT4_ROW_MULTIPLE} (torch's int4 kernel packs rows by 16)",
                option="compression",
            )
    one = _quantize_int8 if scheme.bits == 8 else _quantize_int4
    if weight.ndim == 2:
        qweight, scales, layout = one(_as_fp32(weight, name), scheme, name)
    else:
        # Expert by expert, so a large stack is never copied to fp32 whole.
        parts = [
            one(_as_fp32(weight[e], f"{name}[{e}]"), scheme, f"{name}[{e}]")
            for e in range(shape[0])
        ]
        qweight = torch.stack([p[0] for p in parts])
        scales = torch.stack([p[1] for p in parts])
        layout = parts[0][2]
    return PackedWeight(scheme, shape, qweight, scales, layout)


def _as_fp32(weight: torch.Tensor, name: str) -> torch.Tensor:
    source = weight.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(source).all():
        raise ValueError(
            f"cannot quantize {name!r} of shape {tuple(weight.shape)}: it holds NaN or inf"
        )
    return source


def _round_up(values: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """fp32 values -> `dtype`, never rounding down, so the stored scale still covers the range."""
    out = values.to(dtype)
    low = out.to(torch.float32) < values
    if low.any():
        out = torch.where(low, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
    if not torch.isfinite(out).all():
        raise ValueError(f"cannot quantize {name!r}: its scales overflow {dtype}")
    return out


def _quantize_int8(
    w: torch.Tensor, scheme: CompressionScheme, name: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Symmetric per-output-channel int8; |w - q * scale| <= scale / 2."""
    dtype = _SCALE_DTYPES[scheme.scale_dtype]
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny)
    scale = _round_up(scale, dtype, name)
    codes = torch.round(w / scale.to(torch.float32)[:, None]).clamp_(-127, 127)
    return codes.to(torch.int8).contiguous(), scale.contiguous(), INT8_LAYOUT


def _quantize_int4(
    w: torch.Tensor, scheme: CompressionScheme, name: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Group-wise asymmetric 4-bit in tinygemm's convention; |w - deq| <= scale / 2 per group.

    The zero point is stored in the scale dtype (the kernel reads it so), and rounding it can
    shift the covered range; the scale is therefore widened until [zero - 8 scale, zero + 7 scale]
    covers the group's [min, max] with the rounded zero, so no code is ever clamped.
    """
    dtype = _SCALE_DTYPES[scheme.scale_dtype]
    n, k = w.shape
    g = scheme.group_size
    groups = w.view(n, k // g, g)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    tiny = torch.finfo(dtype).tiny
    scale = ((hi - lo) / 15).clamp(min=tiny)
    zero = (lo + 8 * scale).to(dtype)
    zf = zero.to(torch.float32)
    scale = torch.maximum(scale, torch.maximum((zf - lo) / 8, (hi - zf) / 7)).clamp(min=tiny)
    scale = _round_up(scale, dtype, name)
    sf = scale.to(torch.float32)
    codes = torch.round((groups - zf[..., None]) / sf[..., None]).add_(8).clamp_(0, 15)
    packed, layout = pack_int4_codes(codes.view(n, k))
    scales_and_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
    return packed, scales_and_zeros, layout
