"""Baichuan / Baichuan2 (`baichuan`): Llama without biases, W_pack split [q|k|v], and for
Baichuan2 the NormHead (lm_head rows L2-normalised once at load).

The 7B models use RoPE (base 10000, hard-coded) and their config has `max_position_embeddings`;
the 13B models use ALiBi and their config has only `model_max_length`: that is how the two are told
apart (`baichuan_alibi`). No transformers class has ALiBi with this block, so it is added within
transformers' own machinery: the model runs a registered attention function ("rabbit_alibi", the
eager computation plus the bias slope_h * j on key position j, softmax-equal to the usual
-slope_h * (i - j)) on transformers' causal mask, and its rotary embedding is made the identity
(inv_freq = 0: cos 1, sin 0). Baichuan2 is recognised by `z_loss_weight` in its config or its
125696-token vocabulary (Baichuan 1 has no NormHead).
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import WeightConverter
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv

from rabbit_models.remote.base import Fields, NormalizeRows, RemoteFamily, SplitRows

ALIBI_ATTENTION = "rabbit_alibi"
BAICHUAN2_VOCAB = 125696


def _translate(f: Fields, *, alibi: bool) -> LlamaConfig:
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    f.divisible("hidden_size", hidden, "num_attention_heads", heads)
    max_len = f.need("model_max_length") if alibi else f.need("max_position_embeddings")
    config = LlamaConfig(
        vocab_size=f.need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.need("intermediate_size"),
        num_hidden_layers=f.need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        hidden_act=f.get("hidden_act", "silu", str),
        max_position_embeddings=max_len,
        rms_norm_eps=f.get("rms_norm_eps", 1e-6, float),
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=f.get("tie_word_embeddings", False, bool),
        bos_token_id=f.get("bos_token_id", None),
        eos_token_id=f.get("eos_token_id", None),
        pad_token_id=f.get("pad_token_id", None),
    )
    # Baichuan2 (NormHead) writes z_loss_weight into its config and has a 125696-token vocab;
    # Baichuan 1 (a plain head) has neither
    config.rabbit_norm_head = "z_loss_weight" in f.data or config.vocab_size == BAICHUAN2_VOCAB
    return config


def conversions(config: PretrainedConfig) -> list:
    entries: list = [
        WeightConverter(
            "self_attn.W_pack.weight",
            [f"self_attn.{p}_proj.weight" for p in "qkv"],
            operations=[SplitRows([config.hidden_size] * 3)],
        )
    ]
    if getattr(config, "rabbit_norm_head", False):
        entries.append(
            WeightConverter("lm_head.weight", "lm_head.weight", operations=[NormalizeRows()])
        )
    return entries


def fused(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    return {".self_attn.W_pack.weight": (3 * config.hidden_size, config.hidden_size)}


def alibi_slopes(heads: int) -> torch.Tensor:
    """Baichuan's `_get_interleave`: the power-of-2 slopes, and for other head counts those of
    the largest power of 2 below followed by every other slope of twice that."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_2(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with Baichuan's ALiBi bias (slope_h * key position) added to the scores.

    Scores, bias and softmax are float32 whatever the run dtype: the bias grows with the key
    position (slope 1/2 at position 4095 is 2047.5), which bf16 would round by up to 8."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    slopes = alibi_slopes(query.shape[1]).to(scores.device)
    positions = torch.arange(key.shape[-2], device=scores.device, dtype=torch.float32)
    scores = scores + slopes[:, None, None] * positions[None, None, :]
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]].float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register(ALIBI_ATTENTION, alibi_attention)
AttentionMaskInterface.register(ALIBI_ATTENTION, eager_mask)


def prepare_alibi(model: PreTrainedModel) -> None:
    """No rotary (rotation by angle 0 is the identity) and the ALiBi attention function."""
    rotary = model.base_model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        buf = getattr(rotary, name, None)
        if isinstance(buf, torch.Tensor):
            buf.zero_()
    for config in {id(c): c for c in (model.config, model.base_model.config)}.values():
        config._attn_implementation = ALIBI_ATTENTION


FAMILY = RemoteFamily(
    name="baichuan",
    model_type="baichuan",
    summary="llama (W_pack split into q/k/v; Baichuan2 NormHead)",
    translate=lambda f: _translate(f, alibi=False),
    conversions=conversions,
    fused=fused,
    matches=lambda data: "max_position_embeddings" in data,
)
ALIBI = RemoteFamily(
    name="baichuan_alibi",
    model_type="baichuan",
    summary="llama with ALiBi attention (W_pack split into q/k/v; Baichuan2 NormHead)",
    translate=lambda f: _translate(f, alibi=True),
    conversions=conversions,
    fused=fused,
    matches=lambda data: "max_position_embeddings" not in data,
    prepare=prepare_alibi,
)
