"""InternLM v1 (`internlm`): Llama with q/k/v/o biases when `bias` is set, RoPE base 10000.

The keys are Llama's already; only the config needs translating. The original revision hard-codes
the rotary base 10000 (ignoring a `rope_theta` in config.json); a later one reads
`rotary={"base", "type", "scaling_factor"}`, whose "dynamic" type changes the base only past
`max_position_embeddings`, so longer sequences are refused there rather than computed otherwise.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel

from rabbit_models.remote.base import Fields, RemoteFamily, guard_length


def translate(f: Fields) -> LlamaConfig:
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    f.divisible("hidden_size", hidden, "num_attention_heads", heads)
    rotary = f.get("rotary", None, dict) or {}
    kind = rotary.get("type", "dynamic") if rotary else "origin"
    if kind not in ("origin", "dynamic"):
        raise f.refuse("rotary", f"rotary type {kind!r} is neither 'origin' nor 'dynamic'")
    base = rotary.get("base", 10000)
    if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
        raise f.refuse("rotary", f"rotary base {base!r} is not a positive number")
    config = LlamaConfig(
        vocab_size=f.need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.need("intermediate_size"),
        num_hidden_layers=f.need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=heads,  # MHA: the code ignores a num_key_value_heads in config.json
        head_dim=hidden // heads,
        hidden_act=f.get("hidden_act", "silu", str),
        max_position_embeddings=f.need("max_position_embeddings"),
        rms_norm_eps=f.get("rms_norm_eps", 1e-6, float),
        rope_theta=float(base),
        attention_bias=f.get("bias", True, bool),
        mlp_bias=False,
        tie_word_embeddings=f.get("tie_word_embeddings", False, bool),
        bos_token_id=f.get("bos_token_id", None),
        eos_token_id=f.get("eos_token_id", None),
        pad_token_id=f.get("pad_token_id", None),
    )
    config.rabbit_dynamic_rotary = kind == "dynamic"
    return config


def prepare(model: PreTrainedModel) -> None:
    if getattr(model.config, "rabbit_dynamic_rotary", False):
        guard_length(
            model,
            model.config.max_position_embeddings,
            "InternLM's dynamic rotary scaling changes the base",
        )


def conversions(config: PretrainedConfig) -> list:
    return []


FAMILY = RemoteFamily(
    name="internlm",
    model_type="internlm",
    summary="llama (attention_bias from `bias`)",
    translate=translate,
    conversions=conversions,
    prepare=prepare,
)
