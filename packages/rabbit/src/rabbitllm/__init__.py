"""RabbitLLM: run causal LMs larger than memory by streaming decoder layers."""
