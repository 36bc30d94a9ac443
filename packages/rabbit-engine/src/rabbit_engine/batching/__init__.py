"""Continuous batching and speculative drafts over a (streamed) transformers model.

`BatchScheduler` is what `rabbit serve` and `rabbit batch` run on; the request types import without
torch, the scheduler on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbit_engine.lazy import lazy_exports

if TYPE_CHECKING:
    from rabbit_engine.batching.requests import (
        FinishReason,
        RequestHandle,
        SamplingParams,
        TokenEvent,
    )
    from rabbit_engine.batching.scheduler import BatchScheduler

_EXPORTS = {
    "BatchScheduler": "rabbit_engine.batching.scheduler",
    "FinishReason": "rabbit_engine.batching.requests",
    "RequestHandle": "rabbit_engine.batching.requests",
    "SamplingParams": "rabbit_engine.batching.requests",
    "TokenEvent": "rabbit_engine.batching.requests",
}

__all__ = [
    "BatchScheduler",
    "FinishReason",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
