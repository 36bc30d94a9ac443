"""Family adapters for RabbitLLM: `adapter_for(config)` gives the layout adapter of a model family,
and `support` says which model_types are streamed, how that was verified, and why others are not."""

from rabbit_models.generic import GenericAdapter
from rabbit_models.registry import adapter_for, register_adapter
from rabbit_models.support import SUPPORT, ModelSupport, support_for

__all__ = [
    "SUPPORT",
    "GenericAdapter",
    "ModelSupport",
    "adapter_for",
    "register_adapter",
    "support_for",
]
