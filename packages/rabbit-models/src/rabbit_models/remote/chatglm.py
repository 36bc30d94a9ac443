"""ChatGLM2/3 (`chatglm`): transformers' GLM, which has ChatGLM's block: q/k/v biases, a fused
gate_up MLP ([gate|up], as `dense_h_to_4h`), grouped KV heads, and RoPE on the first half of each
head with interleaved pairs. The fused query_key_value is split [q nh*hd | k g*hd | v g*hd].

The stored rotary `inv_freq` is never read by the original code (it recomputes it) and is ignored.
ChatGLM-6B v1 (GLM 2-D positions) is another architecture; configs of the variants no released
ChatGLM2/3 uses (no multi-query attention, LayerNorm, biases on every linear, post-layernorm
residual, no final norm) are refused, naming the field.
"""

from __future__ import annotations

from transformers import GlmConfig, PretrainedConfig
from transformers.core_model_loading import WeightConverter, WeightRenaming

from rabbit_models.remote.base import Fields, RemoteFamily, SplitRows

_RENAMES = [
    (r"^transformer\.embedding\.word_embeddings\.", "model.embed_tokens."),
    (r"^transformer\.encoder\.final_layernorm\.", "model.norm."),
    (r"^transformer\.encoder\.layers\.", "model.layers."),
    (r"^transformer\.output_layer\.", "lm_head."),
    (r"\.self_attention\.query_key_value\.", ".self_attn.query_key_value."),
    (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.gate_up_proj."),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj."),
]

# field: (the value every released ChatGLM2/3 has, why another is refused)
_FIXED = {
    "multi_query_attention": (
        True,
        "the per-head [q,k,v] layout of full attention is not supported",
    ),
    "rmsnorm": (True, "LayerNorm ChatGLM variants are not supported"),
    "add_bias_linear": (False, "biases on every linear are not supported"),
    "apply_residual_connection_post_layernorm": (
        False,
        "a post-layernorm residual is not supported",
    ),
    "post_layer_norm": (True, "a model without a final norm is not supported"),
}


def translate(f: Fields) -> GlmConfig:
    for name, (value, why) in _FIXED.items():
        if f.get(name, value, bool) != value:
            raise f.refuse(name, why)
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    head_dim = f.get("kv_channels", None, int) or hidden // heads
    groups = f.need("multi_query_group_num")
    f.divisible("num_attention_heads", heads, "multi_query_group_num", groups)
    rope_ratio = f.get("rope_ratio", 1.0, float)
    return GlmConfig(
        vocab_size=f.need("padded_vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.need("ffn_hidden_size"),
        num_hidden_layers=f.need("num_layers"),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        partial_rotary_factor=0.5,
        hidden_act="silu",
        max_position_embeddings=f.get("seq_length", 8192, int),
        rms_norm_eps=f.get("layernorm_epsilon", 1e-5, float),
        rope_theta=10000.0 * rope_ratio,
        attention_bias=f.get("add_qkv_bias", True, bool),
        tie_word_embeddings=f.get("tie_word_embeddings", False, bool),
        bos_token_id=f.get("bos_token_id", None),
        eos_token_id=f.get("eos_token_id", None),
        pad_token_id=f.get("pad_token_id", None),
    )


def _sizes(config: PretrainedConfig) -> list[int]:
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return [q, kv, kv]


def conversions(config: PretrainedConfig) -> list:
    split = SplitRows(_sizes(config))
    entries: list = [WeightRenaming(src, dst) for src, dst in _RENAMES]
    for suffix in ("weight", "bias"):
        entries.append(
            WeightConverter(
                f"self_attn.query_key_value.{suffix}",
                [f"self_attn.{p}_proj.{suffix}" for p in "qkv"],
                operations=[split],
            )
        )
    return entries


def fused(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    rows = sum(_sizes(config))
    return {
        ".self_attention.query_key_value.weight": (rows, config.hidden_size),
        ".self_attention.query_key_value.bias": (rows,),
    }


FAMILY = RemoteFamily(
    name="chatglm",
    model_type="chatglm",
    summary="glm (query_key_value split into q/k/v; half-head interleaved RoPE)",
    translate=translate,
    conversions=conversions,
    fused=fused,
)
