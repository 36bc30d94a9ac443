"""Family adapters for RabbitLLM."""
