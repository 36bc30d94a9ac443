"""Family adapters by model_type. The generic adapter is the default; a family registers its own
only for a real structural difference, and that adapter stays tiny."""

from __future__ import annotations

from transformers import PretrainedConfig

from rabbit_engine.layout import LayoutAdapter
from rabbit_models.generic import GenericAdapter
from rabbit_models.support import check_supported

_ADAPTERS: dict[str, LayoutAdapter] = {}
_GENERIC = GenericAdapter()


def register_adapter(model_type: str, adapter: LayoutAdapter) -> None:
    _ADAPTERS[model_type] = adapter


def adapter_for(config: PretrainedConfig) -> LayoutAdapter:
    """The layout adapter of `config`'s family, after the support table has had its say.

    Raises UnsupportedModelError for a refused model_type (with the table's reason); the facade
    calls this right after reading config.json, so a refused model fails before any weight file is
    opened.
    """
    from rabbit_models.remote import remote_adapter

    remote = remote_adapter(config)  # a config translated from a remote-code family
    if remote is not None:
        return remote
    check_supported(config)
    return _ADAPTERS.get(config.model_type, _GENERIC)
