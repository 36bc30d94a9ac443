"""Platform facts users ask about: can Flash Attention 2 run here, and why not."""

from __future__ import annotations

import torch

from rabbit_engine.attention import flash_attention_status


def is_flash_attention_available(dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """`(True, "")` when flash_attention_2 would be chosen here, else `(False, reason)`."""
    return flash_attention_status(dtype)
