"""Tiny random models, one per causal-LM model_type that rabbit_models supports.

Used by the engine's parity tests: each family's config is tiny (2-4 decoder layers, hidden 64,
vocab 256, 4 heads / 2 kv heads where the family has GQA, intermediate 128), its weights are
random with a fixed seed and a spread large enough that logits are decisive and greedy tokens vary.
All facts about one family are fields of its FamilySpec; whether a type is supported (and since
which transformers) is rabbit_models.support's table, which the tests check against FAMILIES.

    FAMILIES[model_type].make_config() -> a fresh PretrainedConfig
    available_families()               -> the families the installed transformers can build
    build_model(model_type)            -> eval() model with deterministic random weights
    save_checkpoint(model, path, sharded=...) -> save_pretrained dir (>= 3 shards if sharded)

Conventions every config follows (so generation is not flaky): no dropout, pad_token_id=0,
bos_token_id=1, eos_token_id=255 (vocab - 1: one token of 256, so it cannot dominate; tests pass
min_new_tokens so that it never ends a run early), max_position_embeddings=256, default rope.
tie_word_embeddings=True and False are both covered (per family, see each config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rabbit_models.support import SUPPORT

VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, VOCAB - 1

# Shared by every family; a family's own entries override these.
_BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    use_cache=True,
)

# Small MoE: 4 experts, top-2.
_MOE_EXPERTS, _MOE_TOPK, _MOE_INTER = 4, 2, 64

SW = "sliding_attention"
FULL = "full_attention"


class _Drop:
    def __repr__(self) -> str:
        return "<drop>"


_DROP: Any = _Drop()  # an override value that removes a _BASE key for that family

# Keys the "shrink" builder sets wherever the type's default config (or sub-config) has them: the
# families added from the support-table sweep (encoder, encoder-decoder, hybrid/recurrent and
# multimodal classes) spell their sizes in many ways, and only keys the config knows are set.
_SHRINK: dict[str, Any] = {
    **_BASE,
    "d_model": 64,
    "n_embd": 64,
    "emb_dim": 64,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "n_head": 4,
    "n_heads": 4,
    "n_positions": 256,
    "dropout": 0.0,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "decoder_start_token_id": BOS_ID,
    "num_experts": _MOE_EXPERTS,
    "n_routed_experts": _MOE_EXPERTS,
    "num_local_experts": _MOE_EXPERTS,
    "moe_num_experts": _MOE_EXPERTS,
    "num_experts_per_tok": _MOE_TOPK,
    "moe_topk": _MOE_TOPK,
    "moe_k": _MOE_TOPK,
    "moe_intermediate_size": _MOE_INTER,
    "shared_expert_intermediate_size": _MOE_INTER,
    "expert_ffn_hidden_size": _MOE_INTER,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "n_group": 1,
    "topk_group": 1,
    "time_step_limit": [0.0, 100.0],  # the default's Infinity does not survive config.json
    "forced_eos_token_id": None,  # else generate() forces EOS at max_length (bart and kin)
    "shape_vocab_size": 32,
    "pronunciation_vocab_size": 32,
    "dim_ff": 128,
    "dim_head": 16,
    "ffn_dim": 128,
}
# Multi-head latent attention with a sparse-attention indexer, tiny.
_MLA_INDEXER: dict[str, Any] = dict(
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_n_heads=2,
    index_head_dim=16,
)


@dataclass(frozen=True)
class FamilySpec:
    """Everything the tests know about one model_type's tiny checkpoint.

    Whether the type is supported, and since which transformers, is rabbit_models' table
    (`min_transformers` reads it); this spec says how to build a tiny random model of it.
    """

    model_type: str
    overrides: Mapping[str, Any]  # config kwargs (builder "base": over _BASE)
    notes: str = ""
    required: bool = False  # parity runs in the default (not slow) selection
    bit_exact: bool = False  # also checked in bit-exact mode (weights copied to aligned memory)
    init: Mapping[str, float] = field(default_factory=dict)  # layer_std/head_std/embed_std
    kv_cache: bool = True  # decodes with a DynamicCache (False: its own recurrent/SSM state)
    shrink: bool = False  # builder "shrink": _SHRINK's keys wherever the default config has them
    sub: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per sub-config overrides
    # Checkpoints of the type are saved by this (multimodal) class, not by the causal-LM class
    # transformers loads them into (mllama: MllamaForConditionalGeneration -> MllamaForCausalLM).
    checkpoint_class: str | None = None
    # float32 logits may differ by this many ulps (alignment noise; see test_family_parity)
    fp32_ulps: int = 32
    bf16_tolerance: float = 2**-7  # bf16 logits may differ by this fraction of their magnitude
    # The attention the bf16 reference is loaded with, where transformers' default differs from
    # the engine's choice (see rabbit_models.support's row for the type).
    # Non-empty: transformers' own generate() with its cache picks other greedy tokens than a
    # forward over the whole sequence (the model, not streaming: parity holds either way).
    recompute_differs: str = ""

    @property
    def min_transformers(self) -> str:
        return SUPPORT[self.model_type].min_transformers

    def make_config(self):
        """A fresh tiny PretrainedConfig of this type."""
        from transformers import AutoConfig

        if not self.shrink:
            kwargs = {**_BASE, **self.overrides}
            kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
            return AutoConfig.for_model(self.model_type, **kwargs)
        default = AutoConfig.for_model(self.model_type)
        kwargs = {**_shrunk(default.to_dict()), **self.overrides}
        for name, value in vars(default).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
                sub = value.to_dict()
                kwargs[name] = {**sub, **_shrunk(sub), **self.sub.get(name, {})}
        return AutoConfig.for_model(self.model_type, **kwargs)


def _shrunk(default: dict[str, Any]) -> dict[str, Any]:
    """_SHRINK's values for the keys `default` has; layer_types cut to one layer per kind."""
    out = {k: v for k, v in _SHRINK.items() if k in default}
    kinds = default.get("layer_types")
    if isinstance(kinds, list) and kinds:
        unique = list(dict.fromkeys(kinds))
        n = max(2, len(unique))
        out["layer_types"] = (unique * n)[:n]
        out.update({k: n for k in ("num_hidden_layers", "num_layers", "n_layer") if k in out})
    return out


FAMILIES: dict[str, FamilySpec] = {}


def _family(
    model_type: str,
    notes: str = "",
    *,
    required: bool = False,
    bit_exact: bool = False,
    init: Mapping[str, float] | None = None,
    kv_cache: bool = True,
    shrink: bool = False,
    sub: Mapping[str, Mapping[str, Any]] | None = None,
    checkpoint_class: str | None = None,
    fp32_ulps: int = 32,
    bf16_tolerance: float = 2**-7,
    recompute_differs: str = "",
    **overrides: Any,
) -> None:
    if model_type in FAMILIES:
        raise ValueError(f"duplicate family {model_type}")
    FAMILIES[model_type] = FamilySpec(
        model_type,
        overrides,
        notes,
        required=required,
        bit_exact=bit_exact,
        init=init or {},
        kv_cache=kv_cache,
        shrink=shrink,
        sub=sub or {},
        checkpoint_class=checkpoint_class,
        fp32_ulps=fp32_ulps,
        bf16_tolerance=bf16_tolerance,
        recompute_differs=recompute_differs,
    )


# ---------------------------------------------------------------------------------------------
# Families required by the issue list.
# ---------------------------------------------------------------------------------------------
_family("llama", bit_exact=True, required=True, notes="reference dense family, untied")
_family("mistral", required=True, sliding_window=None, notes="untied")
_family(
    "mixtral",
    bit_exact=True,
    required=True,
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    router_jitter_noise=0.0,
    sliding_window=None,
    notes="MoE in every layer, untied",
)
_family(
    "qwen2",
    required=True,
    tie_word_embeddings=True,
    use_sliding_window=False,
    notes="qkv bias, tied",
)
_family(
    "qwen2_moe",
    required=True,
    num_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    moe_intermediate_size=_MOE_INTER,
    shared_expert_intermediate_size=128,
    decoder_sparse_step=1,
    mlp_only_layers=[0],
    use_sliding_window=False,
    notes="layer 0 dense (mlp_only_layers), layer 1 MoE + shared expert",
)
_family(
    "qwen3",
    bit_exact=True,
    required=True,
    head_dim=32,
    tie_word_embeddings=True,
    use_sliding_window=False,
    notes="head_dim 32 != hidden/heads (16): q/k/v/o shapes differ from hidden; q/k norm; tied",
)
_family(
    "qwen3_moe",
    required=True,
    head_dim=32,
    num_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    moe_intermediate_size=_MOE_INTER,
    decoder_sparse_step=1,
    mlp_only_layers=[0],
    norm_topk_prob=True,
    use_sliding_window=False,
    notes="layer 0 dense, layer 1 MoE; head_dim 32",
)
_family(
    "gemma",
    init=dict(layer_std=0.3),
    required=True,
    tie_word_embeddings=True,
    notes="embeddings scaled by sqrt(hidden), (1+w) norms",
)
_family(
    "gemma2",
    bit_exact=True,
    required=True,
    num_hidden_layers=3,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=[SW, FULL, SW],
    notes="sliding window 8 on layers 0 and 2, logit soft-capping; untied (tied + post-norms + "
    "sqrt(hidden) embedding scale makes random weights repeat the last token)",
)
_family(
    "gemma3_text",
    required=True,
    num_hidden_layers=3,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=[SW, FULL, SW],
    notes="sliding window 8 on layers 0 and 2 (local rope base), q/k norm; untied (see gemma2)",
)
_family(
    "phi",
    required=True,
    notes="partial rotary, parallel attn/mlp, LayerNorm with bias, untied lm_head bias",
)
_family("phi3", required=True, sliding_window=None, notes="fused qkv and gate_up projections")
_family(
    "deepseek_v2",
    required=True,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_routed_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    n_shared_experts=1,
    moe_intermediate_size=_MOE_INTER,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    head_dim=8,
    num_key_value_heads=4,
    topk_method="greedy",
    notes="MLA without q compression (V2-Lite style); layer 0 dense, layers 1-2 MoE",
)
_family(
    "deepseek_v3",
    bit_exact=True,
    required=True,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_routed_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    n_shared_experts=1,
    moe_intermediate_size=_MOE_INTER,
    n_group=2,
    topk_group=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    head_dim=8,
    num_key_value_heads=4,
    notes="MLA with q compression; grouped routing (2 groups); layer 0 dense, layers 1-2 MoE",
)
_family("olmo2", required=True, notes="post-norm with q/k norm")
_family(
    "granite",
    init=dict(layer_std=0.4),
    required=True,
    embedding_multiplier=4.0,
    residual_multiplier=0.5,
    attention_multiplier=1.0 / 16,
    logits_scaling=2.0,
    tie_word_embeddings=True,
    notes="non-trivial embedding/residual/attention/logit multipliers, tied",
)
_family(
    "starcoder2",
    required=True,
    sliding_window=None,
    residual_dropout=0.0,
    embedding_dropout=0.0,
    tie_word_embeddings=True,
    notes="LayerNorm + biases, GELU MLP, tied",
)

# ---------------------------------------------------------------------------------------------
# Other decoder-only text families transformers ships (standard KV-cache attention + MLP/MoE).
# ---------------------------------------------------------------------------------------------
_MOE = dict(num_experts_per_tok=_MOE_TOPK, moe_intermediate_size=_MOE_INTER)

# Llama-like dense
_family("olmo", clip_qkv=None, notes="non-parametric LayerNorm")
_family("olmo3", sliding_window=8, layer_types=[SW, FULL], notes="sliding window 8 on layer 0")
_family("helium", tie_word_embeddings=True)
_family(
    "smollm3",
    tie_word_embeddings=True,
    no_rope_layers=[1, 0],
    use_sliding_window=False,
    notes="layer 1 is NoPE (no rotary)",
)
_family("arcee", notes="ReLU^2 MLP without gate")
_family(
    "apertus",
    notes="xIELU activation, q/k norm (5.0.0 cannot reload its own save: meta-tensor copy error)",
)
_family("seed_oss", residual_dropout=0.0, attention_bias=True, notes="qkv bias")
_family("ministral", sliding_window=8, layer_types=[SW, FULL], notes="sliding window 8 on layer 0")
_family("ministral3", tie_word_embeddings=True)
_family("glm", partial_rotary_factor=0.5, notes="partial rotary, fused gate_up")
_family(
    "glm4",
    init=dict(layer_std=0.3),
    bit_exact=True,
    partial_rotary_factor=0.5,
    notes="sandwich norms, partial rotary",
)
_family(
    "cohere",
    init=dict(layer_std=0.3, head_std=0.5),
    logit_scale=0.5,
    tie_word_embeddings=True,
    use_qk_norm=True,
    notes="parallel attn/mlp, LayerNorm without bias, logit_scale, tied",
)
_family(
    "cohere2",
    init=dict(layer_std=0.3),
    logit_scale=0.5,
    tie_word_embeddings=True,
    sliding_window=8,
    layer_types=[SW, FULL],
    notes="sliding window 8 on layer 0 (NoPE on the full layer), tied",
)
_family(
    "stablelm",
    use_qkv_bias=True,
    qk_layernorm=True,
    partial_rotary_factor=0.25,
    notes="LayerNorm, partial rotary, per-head q/k LayerNorm",
)
_family(
    "gpt_neox",
    use_parallel_residual=True,
    partial_rotary_factor=0.25,
    classifier_dropout=0.0,
    notes="gpt_neox.layers prefix, fused qkv, parallel residual",
)
_family(
    "falcon",
    new_decoder_architecture=True,
    num_kv_heads=2,
    parallel_attn=True,
    bias=False,
    ffn_hidden_size=128,
    alibi=False,
    multi_query=False,
    head_dim=_DROP,
    notes="transformer.h prefix, new decoder architecture (GQA, two LayerNorms)",
)
_family(
    "exaone4",
    sliding_window=8,
    layer_types=[SW, FULL],
    tie_word_embeddings=True,
    notes="post-norms, q/k norm, sliding window 8 on layer 0 (NoPE on full layers)",
)
_family("ernie4_5", use_bias=False, tie_word_embeddings=True)
_family("hunyuan_v1_dense", notes="q/k norm after rope")
_family("nemotron", partial_rotary_factor=0.5, notes="LayerNorm1P, relu^2 MLP, partial rotary")
_family("persimmon", qk_layernorm=True, notes="LayerNorm, fused qkv, relu^2")
_family("diffllama", lambda_std_dev=0.1, notes="differential attention")
_family("jais2", notes="LayerNorm, biased MLP")
_family("nanochat", tie_word_embeddings=False, notes="parameter-free RMSNorm, logit soft-cap")
_family(
    "hyperclovax",
    embedding_multiplier=2.0,
    residual_multiplier=0.8,
    attention_multiplier=0.25,
    logits_scaling=1.0,
    use_post_norm=True,
    notes="peri-layer norms, granite-style multipliers",
)
_family("exaone", notes="config maps onto LlamaForCausalLM")
_family("internlm3", notes="config maps onto LlamaForCausalLM")
_family("iquestcoder", notes="config maps onto LlamaForCausalLM")
_family("cwm", sliding_window=8, layer_types=[FULL, SW], notes="sliding window 8 on layer 1")
_family(
    "vaultgemma",
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=[SW, FULL],
    notes="gemma-style, sliding window 8 on layer 0; untied (see gemma2)",
)
_family("bitnet", notes="BitNet architecture in plain (unquantized) Linear layers, sub-norms")
_family(
    "granite_swa",
    sliding_window=8,
    layer_types=[FULL, SW],
    embedding_multiplier=2.0,
    residual_multiplier=0.5,
    attention_multiplier=1.0 / 16,
    logits_scaling=2.0,
    notes="granite with sliding window 8 on layer 1",
)
# MoE
_family(
    "olmoe",
    num_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    clip_qkv=None,
    notes="MoE in every layer",
)
_family(
    "flex_olmo", num_experts=_MOE_EXPERTS, num_experts_per_tok=_MOE_TOPK, notes="MoE in every layer"
)
_family(
    "granitemoe",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    embedding_multiplier=2.0,
    residual_multiplier=0.5,
    logits_scaling=2.0,
    notes="MoE in every layer, granite multipliers",
)
_family(
    "granitemoeshared",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    shared_intermediate_size=64,
    notes="MoE + shared MLP in every layer",
)
_family(
    "phimoe",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    router_jitter_noise=0.0,
    input_jitter_noise=0.0,
    sliding_window=None,
    notes="sparsemixer routing, LayerNorm",
)
_family(
    "jetmoe",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    kv_channels=16,
    num_key_value_heads=_DROP,
    head_dim=_DROP,
    tie_word_embeddings=True,
    notes="mixture of attention heads + MoE MLP",
)
_family(
    "ernie4_5_moe",
    moe_num_experts=_MOE_EXPERTS,
    moe_k=_MOE_TOPK,
    moe_intermediate_size=_MOE_INTER,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=1,
    moe_layer_interval=1,
    use_bias=False,
    notes="layer 0 dense, layer 1 MoE + shared expert",
)
_family(
    "hunyuan_v1_moe",
    num_experts=_MOE_EXPERTS,
    moe_topk=_MOE_TOPK,
    notes="MoE + shared MLP in every layer",
)
_family(
    "glm4_moe",
    num_hidden_layers=3,
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    partial_rotary_factor=0.5,
    use_qk_norm=True,
    **_MOE,
    notes="layer 0 dense, layers 1-2 sigmoid-routed MoE",
)
_family(
    "glm4_moe_lite",
    num_hidden_layers=3,
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    mlp_layer_types=["dense", "sparse", "sparse"],
    n_group=1,
    topk_group=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    head_dim=8,
    num_key_value_heads=4,
    **_MOE,
    notes="MLA + MoE (layers 1-2)",
)
_family(
    "minimax_m2",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    router_jitter_noise=0.0,
    notes="MoE in every layer, q/k norm over all heads",
)
_family(
    "solar_open",
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    **_MOE,
    notes="MoE in every layer",
)
_family(
    "dots1",
    num_hidden_layers=3,
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    **_MOE,
    notes="layer 0 dense, layers 1-2 MoE",
)
_family(
    "llama4_text",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=1,
    intermediate_size_mlp=128,
    moe_layers=[1],
    interleave_moe_layer_step=2,
    attention_chunk_size=8,
    no_rope_layers=[1, 0],
    layer_types=["chunked_attention", FULL],
    notes="chunked attention (8) on layer 0, NoPE layer 1, MoE top-1 on layer 1",
)
_family(
    "gpt_oss",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    sliding_window=8,
    layer_types=[SW, FULL],
    head_dim=16,
    notes="attention sinks, clamped swiglu MoE, sliding window 8 on layer 0",
)
_family(
    "dbrx",
    d_model=64,
    n_heads=4,
    n_layers=2,
    max_seq_len=256,
    attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
    ffn_config=dict(
        hidden_size=64, ffn_hidden_size=128, moe_num_experts=_MOE_EXPERTS, moe_top_k=_MOE_TOPK
    ),
    notes="transformer.blocks prefix, MoE in every layer",
)
_family(
    "mellum",
    num_local_experts=_MOE_EXPERTS,
    mlp_layer_types=["dense", "sparse"],
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="layer 0 dense + sliding window 8, layer 1 MoE",
)
_family(
    "afmoe",
    num_experts=_MOE_EXPERTS,
    num_dense_layers=1,
    num_shared_experts=1,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="layer 0 dense, layer 1 MoE",
)
_family(
    "cohere2_moe",
    init=dict(layer_std=0.3),
    logit_scale=0.5,
    num_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    sliding_window=8,
    layer_types=[SW, FULL],
    tie_word_embeddings=True,
    notes="MoE, sliding window 8 on layer 0",
)
_family(
    "laguna",
    num_experts=_MOE_EXPERTS,
    shared_expert_intermediate_size=64,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="MoE + shared expert, sliding window 8 on layer 0",
)
_family(
    "kolibri1",
    num_local_experts=_MOE_EXPERTS,
    shared_expert_intermediate_size=64,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="MoE, sliding window 8 on layer 0",
)
_family(
    "beam",
    num_experts=_MOE_EXPERTS,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="MoE, sliding window 8 on layer 0",
)
_family(
    "flint",
    num_experts=_MOE_EXPERTS,
    shared_expert_intermediate_size=64,
    mlp_only_layers=[0],
    sliding_window=8,
    layer_types=[FULL, SW],
    **_MOE,
    notes="layer 0 dense, layer 1 MoE with sliding window 8",
)
_family(
    "mimo_v2_flash",
    n_routed_experts=_MOE_EXPERTS,
    n_group=1,
    topk_group=1,
    head_dim=24,
    v_head_dim=16,
    sliding_window=8,
    layer_types=[FULL, SW],
    **_MOE,
    notes="q/k head_dim 24 != v head_dim 16, sliding window 8 on layer 1",
)
_family(
    "hy_v3",
    num_experts=_MOE_EXPERTS,
    num_shared_experts=1,
    mlp_layer_types=["dense", "sparse"],
    **_MOE,
    notes="layer 0 dense, layer 1 MoE",
)
_family(
    "exaone_moe",
    num_experts=_MOE_EXPERTS,
    num_shared_experts=1,
    mlp_layer_types=["dense", "sparse"],
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="layer 0 dense + sliding window 8, layer 1 MoE",
)
_family(
    "aria_text",
    moe_num_experts=_MOE_EXPERTS,
    moe_topk=_MOE_TOPK,
    moe_num_shared_experts=1,
    notes="text decoder of Aria: MoE in every layer",
)
_family(
    "sarvam_moe",
    bit_exact=True,
    num_hidden_layers=3,
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    **_MOE,
    notes="config maps onto Glm4MoeForCausalLM",
)
# Multi-head latent attention (MLA) families besides deepseek
_MLA = dict(
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    head_dim=8,
    num_key_value_heads=4,
)
_family("youtu", init=dict(layer_std=0.2), bit_exact=True, **_MLA, notes="MLA, dense MLP")
_family(
    "minicpm3",
    **_MLA,
    scale_emb=2,
    scale_depth=1.4,
    dim_model_base=64,
    notes="MLA, muP-style embedding/depth/logit scales",
)
_family(
    "sarvam_mla",
    num_hidden_layers=3,
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    **{**_MLA, "q_lora_rank": None},
    **_MOE,
    notes="MLA (no q compression) + MoE on layers 1-2",
)
_family(
    "axk1",
    num_hidden_layers=3,
    n_routed_experts=_MOE_EXPERTS,
    n_shared_experts=1,
    mlp_layer_types=["dense", "sparse", "sparse"],
    n_group=1,
    topk_group=1,
    **_MLA,
    **_MOE,
    notes="MLA + MoE on layers 1-2",
)
_family(
    "longcat_flash",
    num_layers=2,
    ffn_hidden_size=128,
    expert_ffn_hidden_size=_MOE_INTER,
    n_routed_experts=_MOE_EXPERTS,
    zero_expert_num=2,
    moe_topk=_MOE_TOPK,
    **_MLA,
    notes="MLA, shortcut-connected MoE with zero (identity) experts; 2 sub-layers per layer "
    "(config.num_hidden_layers reads 4 in transformers 5.0, 2 in later versions)",
)
# Classic GPT-style stacks
_family(
    "gpt2",
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=256,
    n_inner=128,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
    notes="transformer.h prefix, Conv1D weights, learned positions, tied",
)
_family(
    "gpt_bigcode",
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=256,
    n_inner=128,
    multi_query=True,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
    notes="multi-query attention, learned positions",
)
_family(
    "gpt_neo",
    num_layers=2,
    attention_types=[[["global", "local"], 1]],
    window_size=8,
    resid_dropout=0.0,
    embed_dropout=0.0,
    tie_word_embeddings=True,
    notes="alternating global/local (window 8) attention, learned positions",
)
_family(
    "gptj",
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=256,
    n_inner=128,
    rotary_dim=8,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    notes="parallel attn/mlp, partial rotary",
)
_family(
    "codegen",
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=256,
    n_ctx=256,
    n_inner=128,
    rotary_dim=8,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    notes="fused qkv (mp_num=4 layout), partial rotary",
)
_family(
    "bloom",
    n_layer=2,
    n_head=4,
    notes="ALiBi, fused qkv, embedding LayerNorm; untied (tied "
    "random weights repeat the last token)",
)
_family(
    "opt",
    ffn_dim=128,
    word_embed_proj_dim=64,
    do_layer_norm_before=True,
    dropout=0.0,
    activation_dropout=0.0,
    enable_bias=True,
    tie_word_embeddings=True,
    notes="learned positions (offset 2), model.decoder.layers prefix",
)
_family(
    "mpt",
    d_model=64,
    n_heads=4,
    n_layers=2,
    expansion_ratio=2,
    max_seq_len=256,
    attn_config=dict(alibi=True),
    tie_word_embeddings=True,
    notes="ALiBi, transformer.blocks prefix",
)
_family(
    "xglm",
    init=dict(embed_std=0.5),
    d_model=64,
    ffn_dim=128,
    attention_heads=4,
    num_layers=2,
    dropout=0.0,
    activation_dropout=0.0,
    layerdrop=0.0,
    scale_embedding=True,
    notes="sinusoidal positions, scaled embedding; untied (see bloom)",
)
_family(
    "biogpt",
    layerdrop=0.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    activation_dropout=0.0,
    notes="learned positions, scaled embedding; untied (see bloom)",
)
_family(
    "gpt_neox_japanese",
    intermediate_multiple_size=2,
    rotary_pct=1.0,
    hidden_dropout=0.0,
    notes="gpt_neox variant with dense bias",
)

_family(
    "ctrl",
    n_embd=64,
    dff=128,
    n_layer=2,
    n_head=4,
    n_positions=256,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    notes="sinusoidal positions, transformer.h prefix",
)
_family(
    "modernbert-decoder",
    num_hidden_layers=2,
    sliding_window=8,
    local_attention=16,
    layer_types=[SW, FULL],
    tie_word_embeddings=True,
    embedding_dropout=0.0,
    mlp_dropout=0.0,
    notes="ModernBERT trained as a decoder: sliding window 8 on layer 0, tied",
)
_family("apertus1p5_text", notes="text decoder of Apertus 1.5")
_family(
    "gemma4_text",
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16,
    sliding_window=8,
    layer_types=[SW, FULL],
    per_layer_config={},
    num_kv_shared_layers=0,
    notes="per-layer input embeddings, sliding window 8 on layer 0",
)
_family(
    "gemma4_unified_text",
    sliding_window=8,
    layer_types=[SW, FULL],
    per_layer_config={},
    num_kv_shared_layers=0,
    use_bidirectional_attention=None,
    notes="sliding window 8 on layer 0",
)
_family(
    "granitemoe_swa",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    shared_intermediate_size=64,
    sliding_window=8,
    layer_types=[FULL, SW],
    embedding_multiplier=2.0,
    residual_multiplier=0.5,
    logits_scaling=2.0,
    notes="MoE + shared MLP, sliding window 8 on layer 1",
)
_family(
    "doge",
    is_moe=False,
    notes="dynamic-mask attention (keep_window_size default 2048 > any test prompt); "
    "before 5.18 "
    "cached greedy decoding differs from recomputation",
)


# Notes shared by the families the support sweep added.
_ROBERTA_POSITIONS = (
    "position ids from the padding index (RoBERTa style): generate() and a plain forward number "
    "positions differently"
)
_ENCODER = "encoder stack with is_decoder (BERT-style LM head), learned positions"
_DECODER_HALF = (
    "decoder half of an encoder-decoder model, run without encoder states (text in, text out)"
)
_MULTIMODAL = (
    "multimodal class, text path (token ids in, logits out); the vision/audio tower stays resident"
)
_SSM = "SSM/recurrent state (no KV cache): decode steps compared through generate()"
_HYBRID = (
    "hybrid attention + SSM/linear-attention/conv layers: decode steps compared through generate()"
)
_INDEXER = "sparse attention with a learned indexer (its key cache kept beside the KV cache)"

# ---------------------------------------------------------------------------------------------
# Types the first table refused by description and the support sweep found to stream exactly:
# encoder LM heads, decoder halves of encoder-decoder models, multimodal classes (text path),
# SSM/recurrent and hybrid stacks, sparse-indexer attention. Built by "shrink" (see _SHRINK).
# ---------------------------------------------------------------------------------------------
_family(
    "axk2",
    shrink=True,
    **_MLA_INDEXER,
    num_key_value_heads=4,
    notes=_INDEXER,
)
_family(
    "bailing_hybrid",
    shrink=True,
    kv_cache=False,
    num_key_value_heads=4,
    notes=_HYBRID,
)
_family(
    "bamba",
    shrink=True,
    kv_cache=False,
    attn_layer_indices=[1],
    notes=_HYBRID,
)
_family(
    "bart",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "bert",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "bert-generation",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "big_bird",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "bigbird_pegasus",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "blenderbot",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "blenderbot-small",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "camembert",
    recompute_differs=_ROBERTA_POSITIONS,
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "cohere_compass_text",
    shrink=True,
    layer_types=["full_attention", "full_attention"],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    notes="text tower of Cohere Compass; rope parameters per layer type",
)
_family(
    "cpmant",
    shrink=True,
    kv_cache=False,
    notes="segment embeddings, bucketed relative position bias",
)
_family(
    "data2vec-text",
    recompute_differs=_ROBERTA_POSITIONS,
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "deepseek_v32",
    shrink=True,
    **_MLA_INDEXER,
    num_key_value_heads=4,
    notes=_INDEXER,
)
_family(
    "deepseek_v4",
    shrink=True,
    num_hidden_layers=2,
    q_lora_rank=32,
    o_lora_rank=32,
    o_groups=2,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=8,
    head_dim=32,
    qk_rope_head_dim=8,
    sliding_window=8,
    num_nextn_predict_layers=0,
    notes="compressed/hashed sparse attention with indexer",
)
_family(
    "dory",
    fp32_ulps=512,
    bit_exact=True,
    kv_cache=False,
    shrink=True,
    num_hidden_layers=4,
    n_input_layers=1,
    n_recurrent_layers=2,
    n_output_layers=1,
    n_recurrent_loops=2,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    sliding_window=8,
    notes="looped decoder: the recurrent block runs n_recurrent_loops=2 times per token",
)
_family(
    "dots3_note_text",
    shrink=True,
    **{**_MLA_INDEXER, "qk_nope_head_dim": 8},  # its sliding layers need head_dim = nope + rope
    num_key_value_heads=4,
    per_layer_config={},
    notes=_INDEXER,
)
_family(
    "electra",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "ernie",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "falcon_h1",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "falcon_mamba",
    shrink=True,
    kv_cache=False,
    notes=_SSM,
)
_family(
    "fuyu",
    patch_size=4,
    shrink=True,
    notes=_MULTIMODAL,
)
_family(
    "gemma3",
    shrink=True,
    notes=_MULTIMODAL,
)
_family(
    "gemma3n_text",
    shrink=True,
    activation_sparsity_pattern=[0.0, 0.0],
    num_kv_shared_layers=0,
    hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=256,
    notes="AltUp + Laurel blocks, per-layer inputs",
)
_family(
    "gemma4",
    shrink=True,
    sub={
        "text_config": {
            "per_layer_config": {},
            "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 16,
            "vocab_size_per_layer_input": 256,
            "sliding_window": 8,
        }
    },
    notes=_MULTIMODAL,
)
_family(
    "gemma4_unified",
    shrink=True,
    sub={
        "text_config": {
            "per_layer_config": {},
            "num_kv_shared_layers": 0,
            "sliding_window": 8,
            "use_bidirectional_attention": None,
        }
    },
    notes=_MULTIMODAL,
)
_family(
    "git",
    shrink=True,
    notes=_MULTIMODAL,
)
_family(
    "glm_moe_dsa",
    shrink=True,
    **_MLA_INDEXER,
    num_key_value_heads=4,
    notes=_INDEXER,
)
_family(
    "got_ocr2",
    shrink=True,
    notes=_MULTIMODAL,
)
_family("gpt-sw3", shrink=True, notes="config is gpt2")
_family(
    "granitemoehybrid",
    shrink=True,
    kv_cache=False,
    layer_types=["linear_attention", "full_attention"],
    notes=_HYBRID,
)
_family(
    "hy_v4",
    shrink=True,
    **_MLA_INDEXER,
    notes=_INDEXER,
)
_family(
    "inkling2_loop_text",
    shrink=True,
    kv_cache=False,
    unpadded_vocab_size=VOCAB,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
    sliding_window_size=8,
    n_layers_per_attn_res_block=1,
    notes=_HYBRID,
)
_family(
    "inkling2_text",
    shrink=True,
    kv_cache=False,
    unpadded_vocab_size=VOCAB,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
    sliding_window_size=8,
    n_layers_per_attn_res_block=1,
    notes=_HYBRID,
)
_family(
    "inkling_text",
    shrink=True,
    kv_cache=False,
    unpadded_vocab_size=VOCAB,
    notes=_HYBRID,
)
_family(
    "jamba",
    shrink=True,
    kv_cache=False,
    num_hidden_layers=4,
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=2,
    expert_layer_offset=1,
    notes=_HYBRID,
)
_family(
    "lara_mini",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "lfm2",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "lfm2_moe",
    shrink=True,
    kv_cache=False,
    num_dense_layers=1,
    layer_types=["full_attention", "conv"],
    notes=_HYBRID,
)
_family(
    "lfm3",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "llama4",
    shrink=True,
    notes=_MULTIMODAL,
)
_family(
    "mamba",
    shrink=True,
    kv_cache=False,
    notes=_SSM,
)
_family(
    "mamba2",
    shrink=True,
    kv_cache=False,
    num_heads=8,
    head_dim=16,
    n_groups=1,
    notes=_SSM,
)
_family(
    "marian",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "mbart",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "megatron-bert",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "minimax",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "minimax_m3_vl_text",
    shrink=True,
    notes=_INDEXER,
)
_family("moshi", shrink=True, notes="text decoder of the speech-text model")
_family(
    "moss_transcribe_diarize",
    shrink=True,
    notes=_MULTIMODAL,
)
_family(
    "mvp",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "nemotron_h",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "olmo_hybrid",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "openai-gpt",
    shrink=True,
    kv_cache=False,
    notes="no KV cache: every step recomputes the sequence",
)
_family(
    "pegasus",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "phi4_multimodal",
    shrink=True,
    sub={
        "audio_config": dict(
            num_blocks=1,
            ext_pw_out_channel=64,
            depthwise_separable_out_channel=64,
            nemo_conv_channels=64,
        )
    },
    notes=_MULTIMODAL,
)
_family(
    "plbart",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "prophetnet",
    recompute_differs="n-gram (main/predict stream) attention over its cache",
    shrink=True,
    num_encoder_layers=2,
    num_decoder_layers=2,
    notes=_DECODER_HALF,
)
_family(
    "qwen3_5",
    shrink=True,
    kv_cache=False,
    notes=_MULTIMODAL,
)
_family(
    "qwen3_5_moe",
    shrink=True,
    kv_cache=False,
    sub={
        "text_config": {
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        }
    },
    notes=_MULTIMODAL,
)
_family(
    "qwen3_5_moe_text",
    shrink=True,
    kv_cache=False,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    notes=_HYBRID,
)
_family(
    "qwen3_5_text",
    shrink=True,
    kv_cache=False,
    notes=_HYBRID,
)
_family(
    "qwen3_next",
    shrink=True,
    kv_cache=False,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    notes=_HYBRID,
)
_family(
    "recurrent_gemma",
    shrink=True,
    kv_cache=False,
    block_types=["recurrent", "attention"],
    attention_window_size=8,
    lru_width=64,
    notes=_HYBRID,
)
_family(
    "reformer",
    recompute_differs="chunked local/LSH attention: cached decoding attends over other chunks",
    init=dict(layer_std=0.3),
    hash_seed=0,
    shrink=True,
    kv_cache=False,
    is_decoder=True,
    axial_pos_embds=False,
    attn_layers=["local", "lsh"],
    num_hashes=1,
    lsh_attn_chunk_length=8,
    local_attn_chunk_length=8,
    attention_head_size=16,
    feed_forward_size=128,
    notes="local + LSH attention, is_decoder",
)
_family(
    "rembert",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "roberta",
    recompute_differs=_ROBERTA_POSITIONS,
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "roberta-prelayernorm",
    recompute_differs=_ROBERTA_POSITIONS,
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "roc_bert",
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "roformer",
    init=dict(embed_std=0.5, layer_std=0.3),
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "rwkv",
    shrink=True,
    kv_cache=False,
    notes=_SSM,
)
_family(
    "trocr",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "whisper",
    shrink=True,
    notes=_DECODER_HALF,
)
_family(
    "xlm-roberta",
    recompute_differs=_ROBERTA_POSITIONS,
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "xlm-roberta-xl",
    recompute_differs=_ROBERTA_POSITIONS,
    is_decoder=True,
    shrink=True,
    notes=_ENCODER,
)
_family(
    "zamba",
    shrink=True,
    kv_cache=False,
    num_hidden_layers=4,
    layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
    attention_head_dim=16,
    n_mamba_heads=2,
    notes="hybrid; one attention block shared by the hybrid layers (1 and 3)",
)

_family(
    "kimi_linear",
    shrink=True,
    kv_cache=False,
    num_key_value_heads=4,
    num_experts_per_token=2,
    notes=_HYBRID,
)
_family(
    "qwen4_exp",
    shrink=True,
    kv_cache=False,
    sub={
        "text_config": {
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "hc_lowrank": 16,
            "ple_embed_dim": 64,
            "ngram_vocab_size_base": 512,
            "split_ngram_parts": 4,
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 16,
            "indexer_budget": 16,
            "indexer_compress_ratio": 4,
        }
    },
    notes=_MULTIMODAL,
)

_family(
    "xlstm",
    shrink=True,
    kv_cache=False,
    embedding_dim=64,
    num_heads=4,
    qk_dim_factor=1.0,
    notes="mLSTM recurrent state (no KV cache): decode steps compared through generate()",
)
_family(
    "zaya",
    init=dict(embed_std=0.3, layer_std=0.15),
    shrink=True,
    kv_cache=False,
    num_experts_per_tok=1,
    notes=_HYBRID,
)

_family(
    "zamba2",
    shrink=True,
    kv_cache=False,
    num_hidden_layers=4,
    hybrid_layer_ids=[1, 3],
    layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
    n_mamba_heads=4,
    mamba_headdim=32,
    notes="hybrid; the attention block is shared by the hybrid layers (1 and 3)",
)
_family(
    "qwen4_exp_text",
    shrink=True,
    kv_cache=False,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    hc_lowrank=16,
    ple_embed_dim=64,
    ngram_vocab_size_base=512,
    split_ngram_parts=4,
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=16,
    indexer_compress_ratio=4,
    notes=_HYBRID,
)
_family(
    "xlnet",
    recompute_differs="two-stream attention with mems in place of a KV cache",
    shrink=True,
    kv_cache=False,
    notes="two-stream attention, mems (no KV cache); its bf16 fails in transformers itself",
)
_family(
    "mllama",
    shrink=True,
    checkpoint_class="MllamaForConditionalGeneration",
    notes="Llama 3.2 Vision checkpoint loaded as MllamaForCausalLM (text path); the vision "
    "tower's weights are skipped",
)


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------
def _tf_version():
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


def available_families() -> list[str]:
    """Families whose config class exists in the installed transformers and that rabbit_models'
    table verified on a version no newer than it."""
    from packaging.version import Version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    have = _tf_version()
    return [
        name
        for name, spec in FAMILIES.items()
        if name in CONFIG_MAPPING_NAMES and have >= Version(spec.min_transformers)
    ]


# Init spread (see _reinit_). Layer matrices N(0, LAYER_STD); the output head N(0, HEAD_STD) so
# logits spread over a few units (decisive greedy choices, margins well above bf16 noise); input
# embeddings of untied models N(0, EMBED_STD). A tied matrix serves both ends, so it gets
# TIED_STD, and the layers of tied models get TIED_LAYER_STD so that the residual stream is not
# dominated by the last token's own embedding (which makes a tied model repeat that token).
LAYER_STD, HEAD_STD, EMBED_STD = 0.1, 0.5, 0.1
TIED_STD, TIED_LAYER_STD = 0.25, 0.2


def _reinit_(model, seed: int, *, layer_std=None, head_std=None, embed_std=None) -> None:
    """Deterministic random weights with a spread that makes logits decisive.

    Matrices get N(0, std) by role (input embedding, output head, everything else); 1-D
    parameters (norm scales, biases, router biases, sinks, ...) keep transformers' init plus
    N(0, 0.1) noise: norms become ~1 (or ~0 for the (1 + w) norms of the gemma family), biases
    small noise. Parameters are visited in name order with one seeded generator.
    """
    inp = model.get_input_embeddings().weight
    out_mod = model.get_output_embeddings()
    out = out_mod.weight if out_mod is not None else None
    tied = out is not None and out.data_ptr() == inp.data_ptr()
    if tied:
        layer_std = layer_std or TIED_LAYER_STD
        head_std = embed_std = head_std or TIED_STD
    else:
        layer_std = layer_std or LAYER_STD
        head_std = head_std or HEAD_STD
        embed_std = embed_std or EMBED_STD
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if p.data_ptr() == inp.data_ptr():
                std = embed_std
            elif out is not None and p.data_ptr() == out.data_ptr():
                std = head_std
            elif p.ndim >= 2:
                std = layer_std
            else:
                std = 0.1
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if p.ndim >= 2:
                p.copy_(noise.to(p.dtype))
            else:
                p.add_(noise.to(p.dtype))


def build_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **init_std):
    """AutoModelForCausalLM.from_config of the family's tiny config, eval(), fixed random weights.

    `init_std` (layer_std=, head_std=, embed_std=) overrides the spread (the family's own `init`
    and the defaults), for experiments.
    """
    from transformers import AutoModelForCausalLM

    spec = FAMILIES[model_type]
    config = spec.make_config()
    torch.manual_seed(seed)
    if spec.checkpoint_class is not None:
        return _build_via_checkpoint_class(spec, config, dtype, seed, **init_std)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed, **{**spec.init, **init_std})
    model = model.to(dtype).eval()
    return model


def _build_via_checkpoint_class(spec: FamilySpec, config, dtype, seed: int, **init_std):
    """The causal-LM model transformers loads from a checkpoint saved by `checkpoint_class`;
    save_checkpoint then writes that full checkpoint (what users download), not the text model."""
    import tempfile

    import transformers
    from transformers import AutoModelForCausalLM

    full = getattr(transformers, spec.checkpoint_class)._from_config(config, dtype=torch.float32)
    _reinit_(full, seed, **{**spec.init, **init_std})
    with tempfile.TemporaryDirectory() as tmp:
        full.save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    model = model.to(dtype).eval()
    object.__setattr__(model, "_checkpoint_model", full)  # a plain attribute, not a submodule
    return model


def save_checkpoint(model, path, *, sharded: bool) -> Path:
    """save_pretrained into `path` (safetensors); sharded=True splits into >= 3 shards."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_checkpoint_model", model)
    if not sharded:
        model.save_pretrained(path, max_shard_size="10GB")
        return path
    sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
    total, largest = sum(sizes), max(sizes)
    # Shards hold whole tensors; a shard limit of total/4 (but at least the largest tensor) gives
    # >= 3 shards for every family here (the embedding is well under a quarter of the model).
    shard = max(largest, math.ceil(total / 4))
    model.save_pretrained(path, max_shard_size=shard)
    n = len(list(path.glob("*.safetensors")))
    if n < 3:
        raise AssertionError(f"expected >= 3 shards in {path}, got {n}")
    return path
