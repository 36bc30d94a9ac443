"""Layer-streaming forward machinery over transformers' own models."""

from rabbit_engine.attention import (
    PlatformFacts,
    flash_attention_status,
    probe_platform,
    select_attention,
)
from rabbit_engine.config import load_config
from rabbit_engine.layout import LayoutAdapter, ModelLayout
from rabbit_engine.loader import load_streaming_model

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
