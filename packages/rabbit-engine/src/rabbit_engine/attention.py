"""Choosing the attention implementation: flash_attention_2 where it truly works, else sdpa, else
eager.

The decision is a pure function of `PlatformFacts` so it can be tested on a CPU machine by injecting
facts; `probe_platform()` gathers the real ones once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch

from rabbit_engine.options import IMPLEMENTATIONS, parse_attn_implementation

logger = logging.getLogger(__name__)

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PlatformFacts:
    """What decides whether Flash Attention 2 can run here."""

    flash_attn_error: str | None  # None when `import flash_attn` works, else why not
    cuda_available: bool
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    runtime_check_error: str | None = None  # None when a tiny flash-attn call ran and matched sdpa


def _flash_runtime_check() -> str | None:
    """Run one tiny flash-attn call: catches broken installs and ABI mismatches that import
    hides."""
    try:
        from flash_attn import flash_attn_func

        q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
        out = flash_attn_func(q, q, q, causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True
        ).transpose(1, 2)
        torch.cuda.synchronize()
        if not torch.allclose(out, ref, atol=1e-2, rtol=1e-2):
            return "flash-attn's result differs from SDPA's on a test input"
    except Exception as exc:  # any failure means: do not trust it
        return f"flash-attn runtime check failed: {type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=1)
def probe_platform() -> PlatformFacts:
    """Gather the facts once per process (the runtime check launches a CUDA kernel)."""
    if importlib.util.find_spec("flash_attn") is None:
        flash_error: str | None = "the flash-attn package is not installed (pip install flash-attn)"
    else:
        try:
            import flash_attn  # noqa: F401

            flash_error = None
        except Exception as exc:
            flash_error = f"flash-attn fails to import: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return PlatformFacts(flash_attn_error=flash_error, cuda_available=False)
    name = torch.cuda.get_device_name()
    capability = torch.cuda.get_device_capability()
    runtime_error = None
    if flash_error is None and capability >= (8, 0):
        runtime_error = _flash_runtime_check()
    return PlatformFacts(flash_error, True, name, capability, runtime_error)


def flash_attention_status(
    dtype: torch.dtype | None = None, facts: PlatformFacts | None = None
) -> tuple[bool, str]:
    """`(True, "")` when Flash Attention 2 can be used, else `(False, reason)`."""
    facts = facts or probe_platform()
    if facts.flash_attn_error:
        return False, facts.flash_attn_error
    if not facts.cuda_available:
        return False, "CUDA is not available"
    if facts.compute_capability is None or facts.compute_capability < (8, 0):
        return False, (
            f"{facts.gpu_name} has compute capability {facts.compute_capability}; "
            "Flash Attention 2 needs >= 8.0 (Ampere or newer)"
        )
    if facts.runtime_check_error:
        return False, facts.runtime_check_error
    if dtype is not None and dtype not in _FLASH_DTYPES:
        return False, f"dtype {dtype} is not fp16/bf16"
    return True, ""


def select_attention(
    requested: str | None,
    *,
    supports_flash: bool,
    supports_sdpa: bool,
    dtype: torch.dtype,
    device: torch.device,
    facts: PlatformFacts | None = None,
) -> str:
    """Walk the chain flash_attention_2 -> sdpa -> eager from the requested starting point.

    `"auto"` starts at flash; an explicit request starts at itself and, if it cannot be honoured,
    falls back along the same chain with a warning.
    """
    requested = parse_attn_implementation(requested)
    start = 0 if requested == "auto" else IMPLEMENTATIONS.index(requested)
    for impl in IMPLEMENTATIONS[start:]:
        if impl == "flash_attention_2":
            if device.type != "cuda":
                ok, reason = False, f"the model runs on {device.type}, not CUDA"
            else:
                ok, reason = flash_attention_status(dtype, facts)
            if ok and not supports_flash:
                ok, reason = False, "this model family does not support it in transformers"
            if ok:
                logger.info(
                    "Attention: Flash Attention 2 available on %s",
                    (facts or probe_platform()).gpu_name,
                )
                return impl
            logger.info("Flash Attention not available: %s. Using SDPA", reason)
            if requested == impl:
                logger.warning(
                    "attn_implementation='flash_attention_2' cannot be used (%s); falling back.",
                    reason,
                )
        elif impl == "sdpa":
            if supports_sdpa:
                return impl
            if requested == impl:
                logger.warning(
                    "attn_implementation='sdpa' is not supported by this model family; using eager."
                )
        else:
            return impl
    return "eager"
