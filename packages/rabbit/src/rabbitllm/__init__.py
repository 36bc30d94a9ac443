"""RabbitLLM: run causal LMs larger than memory by streaming decoder layers from storage."""

from rabbitllm.auto import AutoModel

__all__ = ["AutoModel"]
__version__ = "0.1.0"
