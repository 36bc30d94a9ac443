"""The byte layout of torch's CPU int4 kernel, which depends on the CPU it was packed on.

`aten._convert_weight_to_int4pack_for_cpu(codes[N, K] int32 0..15, inner_k_tiles)` returns uint8
[N, K/2], but the order of the nibbles in it follows the ATen CPU capability the op ran under
(aten/src/ATen/native/cpu/int4mm_kernel.cpp, `weight_to_int4pack_kernel`; verified against torch
2.13 on AVX512, AVX2 and DEFAULT through ATEN_CPU_CAPABILITY): rows are cut in blocks of BLOCK_N
(64 on AVX512, 32 otherwise), each block stored as [K, nb/2] bytes, and

- AVX512, full 64-row block: byte (k, j) holds row j in its low nibble and row j+32 in its high one;
- AVX2, full 32-row block: byte (k, j) holds row j (low) and row j+16 (high);
- DEFAULT, and the short last block (16/32/48 rows) everywhere: byte (k, j) holds rows 2j, 2j+1.

So a packed int4 tensor is only valid on a CPU with the same capability: each packed tensor carries
its layout tag, and `repack_int4` moves it to this CPU's layout (through the plain codes) when a
split written on one machine is read on another. The inner_k_tiles argument is ignored on CPU.
"""

from __future__ import annotations

import torch

from rabbit_engine.errors import InvalidOptionError

__all__ = [
    "INT4_LAYOUTS",
    "INT4_LAYOUT_PREFIX",
    "current_int4_layout",
    "pack_int4_codes",
    "pack_int4_codes_as",
    "unpack_int4_codes",
]

INT4_LAYOUT_PREFIX = "int4pack_cpu:"

# capability -> (BLOCK_N, full blocks split in halves rather than interleaved in pairs)
_BLOCKS: dict[str, tuple[int, bool]] = {
    "AVX512": (64, True),
    "AVX2": (32, True),
    "DEFAULT": (32, False),
}
#: Every int4 layout tag this version reads (and repacks to this CPU's).
INT4_LAYOUTS: tuple[str, ...] = tuple(INT4_LAYOUT_PREFIX + c for c in _BLOCKS)


def current_int4_layout() -> str:
    """The layout tag `_convert_weight_to_int4pack_for_cpu` produces in this process."""
    return INT4_LAYOUT_PREFIX + torch.backends.cpu.get_cpu_capability()


def pack_int4_codes(codes: torch.Tensor) -> tuple[torch.Tensor, str]:
    """codes [N, K] (values 0..15) -> (this CPU's kernel layout, uint8 [N, K/2]; its layout tag)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).contiguous(), 1
    )
    return packed, current_int4_layout()


def pack_int4_codes_as(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """codes [N, K] (values 0..15) -> uint8 [N, K/2] in `layout`, whatever this CPU's is.

    The inverse of `unpack_int4_codes`, without torch's op (which only packs for the capability it
    runs under): what a split written on another CPU holds, for tools and tests of repacking.
    """
    block_n, halves = _blocks(layout)
    n, k = codes.shape
    if k % 2 or n % 16:
        raise ValueError(f"int4 codes of shape {(n, k)}: N must be a multiple of 16 and K even")
    codes = codes.to(torch.uint8)
    blocks = []
    for start in range(0, n, block_n):
        nb = min(block_n, n - start)
        rows = codes[start : start + nb].t()  # [K, nb]: one byte row per input feature
        if halves and nb == block_n:
            low, high = rows[:, : nb // 2], rows[:, nb // 2 :]
        else:
            low, high = rows[:, 0::2], rows[:, 1::2]
        blocks.append((low | high << 4).reshape(-1))
    return torch.cat(blocks).view(n, k // 2).contiguous()


def _blocks(layout: str) -> tuple[int, bool]:
    capability = layout.removeprefix(INT4_LAYOUT_PREFIX)
    if not layout.startswith(INT4_LAYOUT_PREFIX) or capability not in _BLOCKS:
        raise InvalidOptionError(
            f"int4 layout {layout!r} is not one this version can read (known: "
            f"{', '.join(INT4_LAYOUT_PREFIX + c for c in _BLOCKS)})",
            option="layout",
        )
    return _BLOCKS[capability]


def unpack_int4_codes(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 [N, K/2] in `layout` -> the codes [N, K] as uint8 (0..15); the inverse of packing."""
    block_n, halves = _blocks(layout)
    n, half_k = packed.shape
    k = half_k * 2
    flat = packed.reshape(-1)
    rows = []
    for start in range(0, n, block_n):
        nb = min(block_n, n - start)
        block = flat[start * half_k : (start + nb) * half_k].view(k, nb // 2)
        low, high = block & 0x0F, block >> 4
        if halves and nb == block_n:
            rows.append(torch.cat([low, high], dim=1).t())
        else:
            rows.append(torch.stack([low, high], dim=2).reshape(k, nb).t())
    return torch.cat(rows, dim=0).contiguous()
