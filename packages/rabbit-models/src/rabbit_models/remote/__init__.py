"""Families whose hub checkpoints ship their own modeling code, streamed natively.

`translate_config` is the hook the facade passes to `rabbit_engine.load_config(translate=)`: a
config.json of one of these model_types (without trust_remote_code) becomes the config of the
transformers class that computes the same function, marked with the family it came from; the
family's `RemoteAdapter` (registered in rabbit_models.registry) then gives the engine the key
renamings and fused-tensor splits, checks the fused tensors' shapes, and prepares the built model.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from rabbit_engine.layout import ModelLayout
from rabbit_models.generic import GenericAdapter
from rabbit_models.remote import baichuan, chatglm, internlm, internlm2, qwen
from rabbit_models.remote.base import (
    FAMILY_ATTR,
    Fields,
    RemoteConfigError,
    RemoteFamily,
    SequenceTooLongError,
    check_fused_shapes,
)

logger = logging.getLogger(__name__)

FAMILIES: dict[str, RemoteFamily] = {
    f.name: f
    for f in (
        internlm.FAMILY,
        internlm2.FAMILY,
        qwen.FAMILY,
        baichuan.FAMILY,
        baichuan.ALIBI,
        chatglm.FAMILY,
    )
}
MODEL_TYPES = frozenset(f.model_type for f in FAMILIES.values())


def family_for(data: dict[str, Any]) -> RemoteFamily | None:
    """The family of a raw config.json, or None when it is not a remote-code family."""
    for family in FAMILIES.values():
        if family.model_type == data.get("model_type") and family.matches(data):
            return family
    return None


def translate_config(data: dict[str, Any], location: str) -> PretrainedConfig | None:
    """config.json -> the transformers config that computes the same model, or None for a
    model_type that is not one of these families (the engine then goes on as usual)."""
    family = family_for(data)
    if family is None:
        return None
    if data.get("quantization_config"):
        raise RemoteConfigError(
            f"{location}/config.json: a pre-quantized {family.model_type} checkpoint "
            "(quantization_config) cannot be streamed natively; load the unquantized checkpoint "
            "(and compress it with compression=) or pass trust_remote_code=True.",
            field="quantization_config",
        )
    config = family.translate(Fields(data, location, family.model_type))
    setattr(config, FAMILY_ATTR, family.name)
    return config


class RemoteAdapter(GenericAdapter):
    """The generic layout, plus the family's weight conversions and model preparation."""

    def __init__(self, family: RemoteFamily) -> None:
        self.family = family

    def layout(self, model: PreTrainedModel) -> ModelLayout:
        logger.info(
            "model_type=%r streamed natively as %s (no code from the checkpoint runs)",
            self.family.model_type,
            self.describe(),
        )
        if self.family.prepare is not None:
            self.family.prepare(model)
        return super().layout(model)

    def weight_conversions(self, model: PreTrainedModel, index) -> list:
        """Renamings and converters that map this family's checkpoint keys onto `model`, after
        checking the fused tensors' shapes against the config (a split that fails inside
        transformers would only leave its targets unloaded)."""
        check_fused_shapes(self.family, model.config, index)
        return self.family.conversions(model.config)

    def describe(self) -> str:
        """The adapter and what it streams the family as (said at load)."""
        return f"rabbit_models.remote.{self.family.name}: {self.family.summary}"


ADAPTERS = {name: RemoteAdapter(family) for name, family in FAMILIES.items()}


def remote_adapter(config: PretrainedConfig) -> RemoteAdapter | None:
    """The adapter of a config translated by `translate_config`, else None."""
    name = getattr(config, FAMILY_ATTR, None)
    return ADAPTERS.get(name) if name else None


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "MODEL_TYPES",
    "RemoteAdapter",
    "RemoteConfigError",
    "SequenceTooLongError",
    "family_for",
    "remote_adapter",
    "translate_config",
]
