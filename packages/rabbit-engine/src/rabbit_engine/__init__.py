"""Layer-streaming forward machinery over transformers' own models.

Lazy: the names below are imported on first use, so that torch-free modules (`rabbit_engine.cgroup`,
used by tools that only read memory limits) import without torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbit_engine.lazy import lazy_exports

if TYPE_CHECKING:
    from rabbit_engine.attention import (
        PlatformFacts,
        flash_attention_status,
        probe_platform,
        select_attention,
    )
    from rabbit_engine.config import load_config
    from rabbit_engine.layout import LayoutAdapter, ModelLayout
    from rabbit_engine.loader import load_streaming_model

_EXPORTS = {
    "LayoutAdapter": "rabbit_engine.layout",
    "ModelLayout": "rabbit_engine.layout",
    "PlatformFacts": "rabbit_engine.attention",
    "flash_attention_status": "rabbit_engine.attention",
    "load_config": "rabbit_engine.config",
    "load_streaming_model": "rabbit_engine.loader",
    "probe_platform": "rabbit_engine.attention",
    "select_attention": "rabbit_engine.attention",
}

__all__ = [
    "LayoutAdapter",
    "ModelLayout",
    "PlatformFacts",
    "flash_attention_status",
    "load_config",
    "load_streaming_model",
    "probe_platform",
    "select_attention",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
