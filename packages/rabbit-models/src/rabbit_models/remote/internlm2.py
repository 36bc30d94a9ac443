"""InternLM2 / 2.5 (`internlm2`): Llama with GQA, renamed keys and a wqkv fused per KV head.

wqkv's rows are grouped per KV head ([q heads of the group, k, v] blocks of head_dim rows), so it
is split with `SplitGroupedQKV`, not as contiguous [q|k|v]. The MLP's w1 is the gate, w3 the up
projection, w2 the down projection. `rope_scaling` "linear" is transformers' linear scaling;
"dynamic" changes the base only past `max_position_embeddings`, where sequences are refused.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import WeightConverter, WeightRenaming

from rabbit_models.remote.base import Fields, RemoteFamily, SplitGroupedQKV, guard_length

_RENAMES = [
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.attention\.wqkv\.", ".self_attn.wqkv."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"^output\.", "lm_head."),
]


def translate(f: Fields) -> LlamaConfig:
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    kv_heads = f.get("num_key_value_heads", heads, int)
    f.divisible("hidden_size", hidden, "num_attention_heads", heads)
    f.divisible("num_attention_heads", heads, "num_key_value_heads", kv_heads)
    scaling = f.get("rope_scaling", None, dict)
    rope_scaling, dynamic = None, False
    if scaling is not None:
        kind, factor = scaling.get("type"), scaling.get("factor")
        if kind not in ("linear", "dynamic") or not isinstance(factor, (int, float)):
            raise f.refuse("rope_scaling", "only {'type': 'linear'|'dynamic', 'factor': f} exists")
        if kind == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        dynamic = kind == "dynamic"
    extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
    config = LlamaConfig(
        vocab_size=f.need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.need("intermediate_size"),
        num_hidden_layers=f.need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act=f.get("hidden_act", "silu", str),
        max_position_embeddings=f.need("max_position_embeddings"),
        rms_norm_eps=f.get("rms_norm_eps", 1e-6, float),
        rope_theta=f.get("rope_theta", 10000.0, float),
        attention_bias=f.get("bias", False, bool),
        mlp_bias=False,
        tie_word_embeddings=f.get("tie_word_embeddings", False, bool),
        bos_token_id=f.get("bos_token_id", None),
        eos_token_id=f.get("eos_token_id", None),
        pad_token_id=f.get("pad_token_id", None),
        **extra,
    )
    config.rabbit_dynamic_rotary = dynamic
    return config


def conversions(config: PretrainedConfig) -> list:
    split = SplitGroupedQKV(
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
        config.head_dim,
    )
    entries: list = [WeightRenaming(src, dst) for src, dst in _RENAMES]
    for suffix in ("weight", "bias"):
        entries.append(
            WeightConverter(
                f"self_attn.wqkv.{suffix}",
                [f"self_attn.{p}_proj.{suffix}" for p in "qkv"],
                operations=[split],
            )
        )
    return entries


def fused(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return {".attention.wqkv.weight": (rows, config.hidden_size), ".attention.wqkv.bias": (rows,)}


def prepare(model: PreTrainedModel) -> None:
    if getattr(model.config, "rabbit_dynamic_rotary", False):
        guard_length(
            model,
            model.config.max_position_embeddings,
            "InternLM2's dynamic rope scaling changes the base",
        )


FAMILY = RemoteFamily(
    name="internlm2",
    model_type="internlm2",
    summary="llama (wqkv split per KV group)",
    translate=translate,
    conversions=conversions,
    fused=fused,
    prepare=prepare,
)
