"""Errors the engine raises; all derive from rabbit_store's `RabbitError` so callers catch one type."""

from __future__ import annotations

from rabbit_store.errors import RabbitError


class InvalidOptionError(RabbitError, ValueError):
    """A user-supplied option (device, dtype, max_memory, attn_implementation...) has a bad value."""


class UnsupportedModelError(RabbitError):
    """The checkpoint's architecture is not one RabbitLLM can stream."""


class WeightMismatchError(RabbitError):
    """A checkpoint tensor does not fit the module the config describes (shape, missing, dtype)."""


class MemoryBudgetError(RabbitError):
    """The memory budget cannot hold what streaming needs at minimum."""
