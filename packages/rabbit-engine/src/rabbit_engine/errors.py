"""Errors the engine raises; all derive from rabbit_store's `RabbitError` so callers catch one
type."""

from __future__ import annotations

from rabbit_store.errors import InvalidOptionError, RabbitError

__all__ = [
    "InvalidOptionError",
    "MemoryBudgetError",
    "PickleRefusedError",
    "QueueFullError",
    "RabbitError",
    "SchedulerClosedError",
    "UnsupportedModelError",
    "WeightMismatchError",
]


class UnsupportedModelError(RabbitError):
    """The checkpoint's architecture is not one RabbitLLM can stream."""


class WeightMismatchError(RabbitError):
    """A checkpoint tensor does not fit the module the config describes (shape, missing, dtype)."""


class MemoryBudgetError(RabbitError):
    """The memory budget cannot hold what streaming needs at minimum."""


class PickleRefusedError(RabbitError):
    """The checkpoint is pickle-only and the caller did not opt in with allow_pickle=True."""


class QueueFullError(RabbitError):
    """The batch scheduler already holds as many waiting requests as it was told to queue."""


class SchedulerClosedError(RabbitError):
    """The batch scheduler was closed (shutdown) and takes no more requests."""
