"""A tiny model with a real tokenizer: a 2-layer random Llama (hidden 64) with SmolLM2's tokenizer
and chat template, read from the GGUF file the default model is built from (seconds, without
building the default model), and the same vocabulary size. Prompts, chat templates, multi-byte
characters and stop strings are the real default model's while a step costs milliseconds. Weights
get the spread the engine parity tests use (tests/models/families.py), so greedy logits are
decisive and text can be compared with transformers' own `generate` token for token.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_chat_model(
    path: Path,
    *,
    context: int = 2048,
    vocab_extra: int = 0,
    generation_config: dict | None = None,
) -> Path:
    """`vocab_extra` widens the vocabulary (a model that cannot share the tokenizer's ids; its
    directory then has no tokenizer); `generation_config` adds fields to generation_config.json."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rabbitllm.default_model import locate_gguf
    from tests.models.families import _reinit_

    gguf = locate_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_extra,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    _reinit_(model, seed=0)
    model.save_pretrained(path)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        **(generation_config or {}),
    ).save_pretrained(path)
    if not vocab_extra:
        tokenizer.save_pretrained(path)
    return path
