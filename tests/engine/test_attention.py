"""Attention selection, decided on injected platform facts so it is testable without a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from rabbit_engine.attention import PlatformFacts, flash_attention_status, select_attention
from rabbit_engine.errors import InvalidOptionError

AMPERE = PlatformFacts(
    flash_attn_error=None, cuda_available=True, gpu_name="NVIDIA A100", compute_capability=(8, 0)
)
TURING = PlatformFacts(
    flash_attn_error=None, cuda_available=True, gpu_name="Tesla T4", compute_capability=(7, 5)
)
NO_PKG = PlatformFacts(
    flash_attn_error="the flash-attn package is not installed",
    cuda_available=True,
    gpu_name="NVIDIA A100",
    compute_capability=(8, 0),
)
BROKEN = PlatformFacts(
    flash_attn_error=None,
    cuda_available=True,
    gpu_name="NVIDIA H100",
    compute_capability=(9, 0),
    runtime_check_error="flash-attn runtime check failed: ABI",
)
CUDA = torch.device("cuda")


def pick(requested, facts, *, dtype=torch.bfloat16, device=CUDA, flash=True, sdpa=True):
    return select_attention(
        requested, supports_flash=flash, supports_sdpa=sdpa, dtype=dtype, device=device, facts=facts
    )


def test_auto_picks_flash_on_ampere_with_half_precision(caplog):
    with caplog.at_level(logging.INFO):
        assert pick("auto", AMPERE) == "flash_attention_2"
    assert "Attention: Flash Attention 2 available on NVIDIA A100" in caplog.text


@pytest.mark.parametrize(
    ("facts", "kwargs", "reason"),
    [
        (TURING, {}, "compute capability"),
        (NO_PKG, {}, "not installed"),
        (BROKEN, {}, "runtime check failed"),
        (AMPERE, {"dtype": torch.float32}, "fp16/bf16"),
        (AMPERE, {"device": torch.device("cpu")}, "not CUDA"),
        (AMPERE, {"flash": False}, "does not support"),
    ],
)
def test_auto_falls_back_to_sdpa_and_logs_why(caplog, facts, kwargs, reason):
    with caplog.at_level(logging.INFO):
        assert pick("auto", facts, **kwargs) == "sdpa"
    assert "Flash Attention not available:" in caplog.text and reason in caplog.text
    assert "Using SDPA" in caplog.text


def test_auto_uses_eager_when_sdpa_unsupported():
    assert pick("auto", TURING, sdpa=False) == "eager"


def test_explicit_request_that_cannot_be_honoured_warns_and_falls_back(caplog):
    with caplog.at_level(logging.WARNING):
        assert pick("flash_attention_2", TURING) == "sdpa"
    assert "cannot be used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert pick("sdpa", AMPERE, sdpa=False) == "eager"
    assert "not supported" in caplog.text
    assert pick("eager", AMPERE) == "eager"


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(InvalidOptionError, match="attn_implementation='fast'"):
        pick("fast", AMPERE)


def test_status_tuple():
    assert flash_attention_status(torch.float16, AMPERE) == (True, "")
    ok, reason = flash_attention_status(
        None, PlatformFacts(flash_attn_error=None, cuda_available=False)
    )
    assert not ok and reason == "CUDA is not available"


def test_platform_helper_on_this_machine():
    from rabbitllm.utils.platform import is_flash_attention_available

    ok, reason = is_flash_attention_available()
    assert isinstance(ok, bool) and (ok or reason)


def test_active_implementation_reported(llama_checkpoint, caplog):
    """What "auto" picks follows from this machine's facts: flash_attention_2 on a CUDA device
    where flash-attn works for bf16, else sdpa (Llama supports both)."""
    from rabbit_engine.attention import probe_platform
    from rabbit_engine.options import parse_device
    from rabbitllm import AutoModel

    _, path = llama_checkpoint
    device = parse_device(None)
    flash_ok, _ = flash_attention_status(torch.bfloat16, probe_platform())
    expected = "flash_attention_2" if device.type == "cuda" and flash_ok else "sdpa"
    with caplog.at_level(logging.INFO):
        with AutoModel.from_pretrained(
            path, attn_implementation="auto", dtype=torch.bfloat16
        ) as model:
            assert model.active_attention_implementation == expected
    assert f"Model initialized with attn_implementation='{expected}'" in caplog.text
    with AutoModel.from_pretrained(path, attn_implementation="eager") as model:
        assert model.active_attention_implementation == "eager"
