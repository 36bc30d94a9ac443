"""Family adapters for RabbitLLM: `adapter_for(config)` gives the layout adapter of a model family."""

from rabbit_models.generic import GenericAdapter
from rabbit_models.registry import adapter_for, register_adapter

__all__ = ["GenericAdapter", "adapter_for", "register_adapter"]
