"""What the engine needs to know about a model's structure; family adapters (rabbit_models)
provide it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class ModelLayout:
    layers: torch.nn.ModuleList  # the decoder layers, run in order once per forward
    layers_prefix: str  # their state-dict prefix, e.g. "model.layers"


class LayoutAdapter(Protocol):
    def layout(self, model: PreTrainedModel) -> ModelLayout: ...
