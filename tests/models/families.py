"""Tiny random models, one per decoder-only causal-LM family that transformers ships.

Used by the engine's parity tests: each family's config is tiny (2-3 decoder layers, hidden 64,
vocab 256, 4 heads / 2 kv heads where the family has GQA, intermediate 128), its weights are
random with a fixed seed and a spread large enough that logits are decisive and greedy tokens vary.

    FAMILIES[model_type].make_config() -> a fresh PretrainedConfig
    available_families()               -> the families the installed transformers can build
    build_model(model_type)            -> eval() model with deterministic random weights
    save_checkpoint(model, path, sharded=...) -> save_pretrained dir (>= 3 shards if sharded)

Conventions every config follows (so generation is not flaky): no dropout, pad_token_id=0,
bos_token_id=1, eos_token_id=255 (vocab - 1: one token of 256, so it cannot dominate; tests pass
min_new_tokens so that it never ends a run early), max_position_embeddings=256, default rope.
tie_word_embeddings=True and False are both covered (per family, see each config).

`REJECTED` lists every other model_type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (of the newest
transformers this was written against) with the reason it is not served; no key is in both dicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

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


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    make_config: Callable[[], Any]  # -> transformers.PretrainedConfig
    min_transformers: str = "5.0.0"
    notes: str = ""


def _config(model_type: str, **overrides: Any):
    from transformers import AutoConfig

    kwargs = {**_BASE, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
    return AutoConfig.for_model(model_type, **kwargs)


class _Drop:
    def __repr__(self) -> str:
        return "<drop>"


_DROP: Any = _Drop()  # an override value that removes a _BASE key for that family

FAMILIES: dict[str, FamilySpec] = {}


def _family(model_type: str, min_transformers: str = "5.0.0", notes: str = "", **overrides: Any):
    if model_type in FAMILIES:
        raise ValueError(f"duplicate family {model_type}")

    def make_config():
        return _config(model_type, **overrides)

    FAMILIES[model_type] = FamilySpec(model_type, make_config, min_transformers, notes)


# ---------------------------------------------------------------------------------------------
# Families required by the issue list.
# ---------------------------------------------------------------------------------------------
_family("llama", notes="reference dense family, untied")
_family("mistral", sliding_window=None, notes="untied")
_family(
    "mixtral",
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=_MOE_TOPK,
    router_jitter_noise=0.0,
    sliding_window=None,
    notes="MoE in every layer, untied",
)
_family("qwen2", tie_word_embeddings=True, use_sliding_window=False, notes="qkv bias, tied")
_family(
    "qwen2_moe",
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
    head_dim=32,
    tie_word_embeddings=True,
    use_sliding_window=False,
    notes="head_dim 32 != hidden/heads (16): q/k/v/o shapes differ from hidden; q/k norm; tied",
)
_family(
    "qwen3_moe",
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
_family("gemma", tie_word_embeddings=True, notes="embeddings scaled by sqrt(hidden), (1+w) norms")
_family(
    "gemma2",
    num_hidden_layers=3,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=[SW, FULL, SW],
    notes="sliding window 8 on layers 0 and 2, logit soft-capping; untied (tied + post-norms + "
    "sqrt(hidden) embedding scale makes random weights repeat the last token)",
)
_family(
    "gemma3_text",
    num_hidden_layers=3,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=[SW, FULL, SW],
    notes="sliding window 8 on layers 0 and 2 (local rope base), q/k norm; untied (see gemma2)",
)
_family("phi", notes="partial rotary, parallel attn/mlp, LayerNorm with bias, untied lm_head bias")
_family("phi3", sliding_window=None, notes="fused qkv and gate_up projections")
_family(
    "deepseek_v2",
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
_family("olmo2", notes="post-norm with q/k norm")
_family(
    "granite",
    embedding_multiplier=4.0,
    residual_multiplier=0.5,
    attention_multiplier=1.0 / 16,
    logits_scaling=2.0,
    tie_word_embeddings=True,
    notes="non-trivial embedding/residual/attention/logit multipliers, tied",
)
_family(
    "starcoder2",
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
    min_transformers="5.1.0",
    notes="xIELU activation, q/k norm (5.0.0 cannot reload its own save: meta-tensor copy error)",
)
_family("seed_oss", residual_dropout=0.0, attention_bias=True, notes="qkv bias")
_family("ministral", sliding_window=8, layer_types=[SW, FULL], notes="sliding window 8 on layer 0")
_family("ministral3", tie_word_embeddings=True)
_family("glm", partial_rotary_factor=0.5, notes="partial rotary, fused gate_up")
_family("glm4", partial_rotary_factor=0.5, notes="sandwich norms, partial rotary")
_family(
    "cohere",
    logit_scale=0.5,
    tie_word_embeddings=True,
    use_qk_norm=True,
    notes="parallel attn/mlp, LayerNorm without bias, logit_scale, tied",
)
_family(
    "cohere2",
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
    min_transformers="5.9.0",
    embedding_multiplier=2.0,
    residual_multiplier=0.8,
    attention_multiplier=0.25,
    logits_scaling=1.0,
    use_post_norm=True,
    notes="peri-layer norms, granite-style multipliers",
)
_family("exaone", min_transformers="5.24.0", notes="config maps onto LlamaForCausalLM")
_family("internlm3", min_transformers="5.23.0", notes="config maps onto LlamaForCausalLM")
_family("iquestcoder", min_transformers="5.23.0", notes="config maps onto LlamaForCausalLM")
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
    min_transformers="5.15.0",
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
    min_transformers="5.15.0",
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
    min_transformers="5.10.1",
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
    min_transformers="5.9.0",
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
    min_transformers="5.7.0",
    num_experts=_MOE_EXPERTS,
    shared_expert_intermediate_size=64,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="MoE + shared expert, sliding window 8 on layer 0",
)
_family(
    "kolibri1",
    min_transformers="5.20.0",
    num_local_experts=_MOE_EXPERTS,
    shared_expert_intermediate_size=64,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="MoE, sliding window 8 on layer 0",
)
_family(
    "beam",
    min_transformers="5.21.0",
    num_experts=_MOE_EXPERTS,
    sliding_window=8,
    layer_types=[SW, FULL],
    **_MOE,
    notes="MoE, sliding window 8 on layer 0",
)
_family(
    "flint",
    min_transformers="5.21.0",
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
    min_transformers="5.13.0",
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
    min_transformers="5.6.0",
    num_experts=_MOE_EXPERTS,
    num_shared_experts=1,
    mlp_layer_types=["dense", "sparse"],
    **_MOE,
    notes="layer 0 dense, layer 1 MoE",
)
_family(
    "exaone_moe",
    min_transformers="5.1.0",
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
    min_transformers="5.24.0",
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
_family("youtu", min_transformers="5.1.0", **_MLA, notes="MLA, dense MLP")
_family(
    "minicpm3",
    min_transformers="5.13.0",
    **_MLA,
    scale_emb=2,
    scale_depth=1.4,
    dim_model_base=64,
    notes="MLA, muP-style embedding/depth/logit scales",
)
_family(
    "sarvam_mla",
    min_transformers="5.24.0",
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
    min_transformers="5.15.0",
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
_family("apertus1p5_text", min_transformers="5.24.0", notes="text decoder of Apertus 1.5")
_family(
    "gemma4_text",
    min_transformers="5.5.0",
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
    min_transformers="5.10.1",
    sliding_window=8,
    layer_types=[SW, FULL],
    per_layer_config={},
    num_kv_shared_layers=0,
    use_bidirectional_attention=None,
    notes="sliding window 8 on layer 0",
)
_family(
    "granitemoe_swa",
    min_transformers="5.15.0",
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
    min_transformers="5.18.0",
    is_moe=False,
    notes="dynamic-mask attention (keep_window_size default 2048 > any test prompt); "
    "before 5.18 "
    "cached greedy decoding differs from recomputation",
)

# Shared reasons for REJECTED.
_SPARSE_INDEXER = (
    "sparse attention with a learned indexer (DSA) that keeps its own key cache beside the KV "
    "cache: not a plain layer-by-layer KV cache"
)
_RECURRENT = (
    "hybrid/recurrent layers (SSM, linear attention, conv or recurrent state): the cache is not a "
    "per-layer KV cache, and the fast path needs mamba-ssm/causal-conv1d/flash-linear-attention "
    "kernels"
)
_ENC_DEC = "decoder half of an encoder-decoder model: its layers cross-attend to encoder states"
_ENCODER = (
    "encoder (BERT-style, bidirectionally pre-trained) model with a causal-LM head, not a "
    "decoder-only LM"
)
_MULTIMODAL = (
    "multimodal model: the causal-LM class wraps a vision/audio tower; its text decoder is covered "
    "where it has its own model_type"
)
_AUDIO_CODEBOOKS = (
    "audio codebook decoder (multiple parallel codebook heads) conditioned on a text encoder"
)

# Every other model_type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (5.24; plus 5.0's code_llama).
REJECTED: dict[str, str] = {
    "axk2": _SPARSE_INDEXER,
    "deepseek_v32": _SPARSE_INDEXER,
    "dots3_note_text": _SPARSE_INDEXER,
    "glm_moe_dsa": _SPARSE_INDEXER,
    "hy_v4": _SPARSE_INDEXER,
    "bailing_hybrid": _RECURRENT,
    "bamba": _RECURRENT,
    "falcon_h1": _RECURRENT,
    "falcon_mamba": _RECURRENT,
    "granitemoehybrid": _RECURRENT,
    "inkling2_loop_text": _RECURRENT,
    "inkling2_text": _RECURRENT,
    "inkling_text": _RECURRENT,
    "jamba": _RECURRENT,
    "kimi_linear": _RECURRENT,
    "lara_mini": _RECURRENT,
    "lfm2": _RECURRENT,
    "lfm2_moe": _RECURRENT,
    "lfm3": _RECURRENT,
    "mamba": _RECURRENT,
    "mamba2": _RECURRENT,
    "minimax": _RECURRENT,
    "nemotron_h": _RECURRENT,
    "olmo_hybrid": _RECURRENT,
    "qwen3_5_moe_text": _RECURRENT,
    "qwen3_5_text": _RECURRENT,
    "qwen3_next": _RECURRENT,
    "qwen4_exp_text": _RECURRENT,
    "recurrent_gemma": _RECURRENT,
    "rwkv": _RECURRENT,
    "xlstm": _RECURRENT,
    "zamba": _RECURRENT,
    "zamba2": _RECURRENT,
    "zaya": _RECURRENT,
    "bart": _ENC_DEC,
    "bigbird_pegasus": _ENC_DEC,
    "blenderbot": _ENC_DEC,
    "blenderbot-small": _ENC_DEC,
    "marian": _ENC_DEC,
    "mbart": _ENC_DEC,
    "mvp": _ENC_DEC,
    "pegasus": _ENC_DEC,
    "plbart": _ENC_DEC,
    "prophetnet": _ENC_DEC,
    "trocr": _ENC_DEC,
    "whisper": _ENC_DEC,
    "bert": _ENCODER,
    "bert-generation": _ENCODER,
    "big_bird": _ENCODER,
    "camembert": _ENCODER,
    "data2vec-text": _ENCODER,
    "electra": _ENCODER,
    "ernie": _ENCODER,
    "megatron-bert": _ENCODER,
    "rembert": _ENCODER,
    "roberta": _ENCODER,
    "roberta-prelayernorm": _ENCODER,
    "roc_bert": _ENCODER,
    "roformer": _ENCODER,
    "xlm": _ENCODER,
    "xlm-roberta": _ENCODER,
    "xlm-roberta-xl": _ENCODER,
    "xmod": _ENCODER,
    "dots3_note": _MULTIMODAL,
    "emu3": _MULTIMODAL,
    "fuyu": _MULTIMODAL,
    "gemma3": _MULTIMODAL,
    "gemma3n": _MULTIMODAL,
    "gemma4": _MULTIMODAL,
    "gemma4_unified": _MULTIMODAL,
    "git": _MULTIMODAL,
    "got_ocr2": _MULTIMODAL,
    "llama4": _MULTIMODAL,
    "mllama": _MULTIMODAL,
    "moss_transcribe_diarize": _MULTIMODAL,
    "phi4_multimodal": _MULTIMODAL,
    "qwen3_5": _MULTIMODAL,
    "qwen3_5_moe": _MULTIMODAL,
    "qwen4_exp": _MULTIMODAL,
    "musicgen": _AUDIO_CODEBOOKS,
    "musicgen_melody": _AUDIO_CODEBOOKS,
    "blt": (
        "Byte Latent Transformer: byte-level local encoder/decoder around a patch-level global "
        "transformer with entropy-model patching, not a token decoder stack"
    ),
    "code_llama": (
        "tokenizer-only alias (transformers 5.0 mapping): the model is llama (covered by the llama "
        "family)"
    ),
    "cohere_compass_text": (
        "text tower of Cohere Compass (a multimodal embedding/retrieval model with a pooling "
        "head); "
        "its rotary setup only knows the layer types of its default config (KeyError on a tiny "
        "sliding/full mix)"
    ),
    "cpmant": (
        "CPM-Ant: segment embeddings and a bucketed relative position bias computed outside the "
        "layers, prompt-prefix tokens; not a standard causal LM interface"
    ),
    "deepseek_v4": (
        "compressed + hashed sparse attention with indexer and lightning components: its caches "
        "are "
        "not plain per-layer KV caches"
    ),
    "dory": (
        "looped (recurrent-depth) decoder: the same layers run several times per token, so layers "
        "are not streamed once in order"
    ),
    "gemma3n_text": (
        "AltUp + Laurel blocks with per-layer inputs and KV sharing across layers (later layers "
        "reuse earlier layers' KV): layers are not independent"
    ),
    "gemma4_assistant": (
        "multi-token-prediction drafter for gemma4: consumes the target model's hidden states, not "
        "a stand-alone LM"
    ),
    "gemma4_unified_assistant": (
        "multi-token-prediction drafter for gemma4_unified: consumes the target model's hidden "
        "states, not a stand-alone LM"
    ),
    "gpt-sw3": "tokenizer-only alias: the config and model are gpt2 (covered by the gpt2 family)",
    "hrm_text": (
        "hierarchical reasoning model: recurrent high/low-level modules iterate over the same "
        "layers per token"
    ),
    "minimax_m3_vl_text": (
        "lightning (linear) attention layers plus an indexer: not a plain KV cache"
    ),
    "moshi": "speech-text model (depth decoder over audio codebooks)",
    "openai-gpt": "no KV cache support in transformers (use_cache/past_key_values not implemented)",
    "reformer": "LSH/local attention with reversible layers; needs is_decoder and chunked buckets",
    "xlnet": "permutation LM with two-stream attention and memory (mems), not a causal decoder",
}


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------
def _tf_version():
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


def available_families() -> list[str]:
    """Families whose config class exists in the installed transformers (and is new enough)."""
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
_INIT_OVERRIDES: dict[str, dict[str, float]] = {
    # tied with an input scale (sqrt(hidden) / embedding_multiplier): bigger layers needed.
    "gemma": dict(layer_std=0.3),
    "granite": dict(layer_std=0.4),
    "cohere": dict(layer_std=0.3, head_std=0.5),
    "cohere2": dict(layer_std=0.3),
    "cohere2_moe": dict(layer_std=0.3),
    # untied, but seed 0 of the default spread happens to hit a fixed point
    "glm4": dict(layer_std=0.3),
    "youtu": dict(layer_std=0.2),
    "xglm": dict(embed_std=0.5),  # else the sinusoidal positions dominate the residual stream
}


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
    o = _INIT_OVERRIDES.get(model.config.model_type, {})
    if tied:
        layer_std = layer_std or o.get("layer_std", TIED_LAYER_STD)
        head_std = embed_std = head_std or o.get("head_std", TIED_STD)
    else:
        layer_std = layer_std or o.get("layer_std", LAYER_STD)
        head_std = head_std or o.get("head_std", HEAD_STD)
        embed_std = embed_std or o.get("embed_std", EMBED_STD)
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

    `init_std` (layer_std=, head_std=, embed_std=) overrides the init spread, for experiments.
    """
    from transformers import AutoModelForCausalLM

    spec = FAMILIES[model_type]
    config = spec.make_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed, **init_std)
    model = model.to(dtype).eval()
    return model


def save_checkpoint(model, path, *, sharded: bool) -> Path:
    """save_pretrained into `path` (safetensors); sharded=True splits into >= 3 shards."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
