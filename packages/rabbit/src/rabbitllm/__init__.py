"""RabbitLLM: run causal LMs larger than memory by streaming decoder layers from storage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AutoModel"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from rabbitllm.auto import AutoModel


def __getattr__(name: str) -> Any:
    # Lazy: `import rabbitllm` (and so `rabbit --help`) must not pay for torch and transformers.
    if name == "AutoModel":
        from rabbitllm.auto import AutoModel

        return AutoModel
    raise AttributeError(f"module 'rabbitllm' has no attribute {name!r}")
