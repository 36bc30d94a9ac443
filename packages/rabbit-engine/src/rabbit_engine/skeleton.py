"""Building transformers' own model from its config with no weight memory.

Parameters live on the meta device; buffers (rotary `inv_freq` and friends) are real and keep the
dtype transformers gives them (casting them is how an earlier engine lost bf16 exactness).
"""

from __future__ import annotations

import logging

import torch
from accelerate import init_empty_weights
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from rabbit_engine.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


def supported_model_types() -> list[str]:
    """model_type of every causal-LM class this transformers ships, sorted."""
    return sorted({c.model_type for c in MODEL_FOR_CAUSAL_LM_MAPPING.keys() if c.model_type})


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """transformers' own causal-LM class for this config (no remote code)."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type={config.model_type!r} has no causal-LM class in transformers; "
            f"supported model types: {', '.join(supported_model_types())}."
        ) from None


def build_skeleton(
    config: PretrainedConfig,
    *,
    model_class: type[PreTrainedModel],
    dtype: torch.dtype,
    attn_implementation: str,
) -> PreTrainedModel:
    """Instantiate `model_class` with meta parameters and real buffers, in eval mode."""
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Move real buffers to `device` without touching meta parameters (`model.to` would fail on them)."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
