"""QWen v1 (`qwen`): Qwen2 (q/k/v biases, none elsewhere), keys renamed, c_attn split [q|k|v].

The MLP is `c_proj(w1(x) * silu(w2(x)))`: w2 is the gate and w1 the up projection, and the real
FFN width is `intermediate_size / 2`. Dynamic NTK and logN attention scaling (on by default) act
only once the sequence passes `seq_length`; sequences past it are refused (SequenceTooLongError)
instead of being computed without them. Released checkpoints set `no_bias=true`; other values are
refused, as is a partial rotary (`rotary_pct` below 1), which no released checkpoint uses.
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel, Qwen2Config
from transformers.core_model_loading import WeightConverter, WeightRenaming

from rabbit_models.remote.base import Fields, RemoteFamily, SplitRows, guard_length

_RENAMES = [
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.", "model.layers."),
    (r"\.ln_1\.", ".input_layernorm."),
    (r"\.ln_2\.", ".post_attention_layernorm."),
    (r"\.attn\.c_attn\.", ".self_attn.c_attn."),
    (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
    (r"\.mlp\.w2\.", ".mlp.gate_proj."),
    (r"\.mlp\.w1\.", ".mlp.up_proj."),
    (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
]


def translate(f: Fields) -> Qwen2Config:
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    f.divisible("hidden_size", hidden, "num_attention_heads", heads)
    kv_channels = f.get("kv_channels", hidden // heads, int)
    if kv_channels != hidden // heads:
        raise f.refuse(
            "kv_channels", f"the code needs it equal to hidden_size/heads={hidden // heads}"
        )
    if not f.get("no_bias", True, bool):
        raise f.refuse("no_bias", "released QWen checkpoints have no bias outside c_attn")
    if f.get("rotary_pct", 1.0, float) != 1.0:
        raise f.refuse("rotary_pct", "a partial rotary is not supported")
    intermediate = f.need("intermediate_size")
    f.divisible("intermediate_size", intermediate, "2", 2)
    seq_length = f.need("seq_length")
    config = Qwen2Config(
        vocab_size=f.need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=intermediate // 2,
        num_hidden_layers=f.need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="silu",
        max_position_embeddings=f.get("max_position_embeddings", seq_length, int),
        rms_norm_eps=f.get("layer_norm_epsilon", 1e-6, float),
        rope_theta=f.get("rotary_emb_base", 10000.0, float),
        use_sliding_window=False,
        tie_word_embeddings=f.get("tie_word_embeddings", False, bool),
        bos_token_id=f.get("bos_token_id", None),
        eos_token_id=f.get("eos_token_id", None),
        pad_token_id=f.get("pad_token_id", None),
    )
    scaled = f.get("use_dynamic_ntk", True, bool) or f.get("use_logn_attn", True, bool)
    config.rabbit_exact_up_to = seq_length if scaled else None
    return config


def conversions(config: PretrainedConfig) -> list:
    split = SplitRows([config.hidden_size] * 3)
    entries: list = [WeightRenaming(src, dst) for src, dst in _RENAMES]
    for suffix in ("weight", "bias"):
        entries.append(
            WeightConverter(
                f"self_attn.c_attn.{suffix}",
                [f"self_attn.{p}_proj.{suffix}" for p in "qkv"],
                operations=[split],
            )
        )
    return entries


def fused(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    rows = 3 * config.hidden_size
    return {".attn.c_attn.weight": (rows, config.hidden_size), ".attn.c_attn.bias": (rows,)}


def prepare(model: PreTrainedModel) -> None:
    limit = getattr(model.config, "rabbit_exact_up_to", None)
    if limit:
        guard_length(model, limit, "QWen's dynamic NTK and logN attention scaling start")


FAMILY = RemoteFamily(
    name="qwen",
    model_type="qwen",
    summary="qwen2 (c_attn split into q/k/v; w2 gate, w1 up)",
    translate=translate,
    conversions=conversions,
    fused=fused,
    prepare=prepare,
)
