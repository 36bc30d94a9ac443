"""Layer-streaming forward machinery over transformers models."""
