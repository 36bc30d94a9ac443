"""The adapter that serves every family transformers ships: find the model's decoder-layer list."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rabbit_engine.errors import UnsupportedModelError
from rabbit_engine.layout import ModelLayout

# Where transformers' decoder-only models keep their layers, most common first; `base_model`
# resolves the family's own prefix (model., transformer., ...).
_LAYER_ATTRS = ("layers", "h", "blocks", "decoder.layers", "language_model.layers")


class GenericAdapter:
    """Finds the ModuleList of `config.num_hidden_layers` decoder layers; the rest is resident."""

    def layout(self, model: PreTrainedModel) -> ModelLayout:
        expected = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        candidates: list[tuple[str, torch.nn.ModuleList]] = []
        base = model.base_model
        base_name = "" if base is model else model.base_model_prefix
        for attr in _LAYER_ATTRS:
            try:
                module = base.get_submodule(attr)
            except AttributeError:
                continue
            if isinstance(module, torch.nn.ModuleList):
                candidates.append((f"{base_name}.{attr}".lstrip("."), module))
                break
        if not candidates:  # unusual layout: the longest ModuleList whose length matches the config
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.ModuleList) and len(module) == expected:
                    candidates.append((name, module))
        if not candidates:
            raise UnsupportedModelError(
                f"{type(model).__name__}: cannot find its decoder-layer list; this family needs "
                "its own adapter in rabbit_models."
            )
        # The list found where transformers keeps it is trusted even when its length is not
        # num_hidden_layers (LongcatFlash counts sub-layers there); the weight map then checks every
        # layer against the checkpoint.
        name, layers = candidates[0]
        return ModelLayout(layers=layers, layers_prefix=name)
