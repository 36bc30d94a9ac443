"""Building transformers' own model from its config with no weight memory.

Parameters live on the meta device; buffers (rotary `inv_freq` and friends) are real and keep the
dtype transformers gives them (casting them is how an earlier engine lost bf16 exactness).
"""

from __future__ import annotations

import logging

import torch
from accelerate import init_empty_weights
from transformers import PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import build_glob_alternation
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
    attn_implementation: str | None,
) -> PreTrainedModel:
    """Instantiate `model_class` with meta parameters and real buffers, in eval mode.

    `attn_implementation=None` is transformers' own default, chosen per sub-model."""
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    _apply_dtype_plan(model, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _apply_dtype_plan(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Give parameters the dtype transformers' own `from_pretrained` would load them in.

    `from_pretrained` keeps some modules in float32 (`_keep_in_fp32_modules[_strict]`) through a
    dtype plan applied while loading, which `_from_config` does not apply on every 5.x version (5.0
    builds gpt_oss's norms in bf16, its loader then makes them float32). The plan is taken from
    transformers itself, in whichever form this version has.
    """
    if hasattr(model, "_get_dtype_plan"):
        plan = model._get_dtype_plan(dtype)
    else:
        plan = dict(getattr(model, "dtype_plan", None) or {})
    if not plan:
        return
    pattern, group_to_glob, _ = build_glob_alternation(list(plan))
    for name, param in list(model.named_parameters()):
        match = pattern.search(name)
        if match is None:
            continue
        wanted = plan[group_to_glob[match.lastgroup]]
        if param.dtype != wanted:
            module_path, _, attr = name.rpartition(".")
            module = model.get_submodule(module_path) if module_path else model
            module._parameters[attr] = torch.nn.Parameter(
                torch.empty_like(param, dtype=wanted, device="meta"), requires_grad=False
            )


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Move real buffers to `device` without touching meta parameters (`model.to` fails on them)."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
