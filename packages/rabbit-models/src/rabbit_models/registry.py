"""Family adapters by model_type. The generic adapter is the default; a family registers its own only
for a real structural difference, and that adapter stays tiny."""

from __future__ import annotations

from transformers import PretrainedConfig

from rabbit_engine.layout import LayoutAdapter
from rabbit_models.generic import GenericAdapter

_ADAPTERS: dict[str, LayoutAdapter] = {}
_GENERIC = GenericAdapter()


def register_adapter(model_type: str, adapter: LayoutAdapter) -> None:
    _ADAPTERS[model_type] = adapter


def adapter_for(config: PretrainedConfig) -> LayoutAdapter:
    return _ADAPTERS.get(config.model_type, _GENERIC)
