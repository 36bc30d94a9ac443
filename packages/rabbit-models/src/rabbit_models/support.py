"""Which model_types RabbitLLM streams, how each was verified, and why the others are refused.

The engine builds transformers' own model on the meta device and fills one decoder layer at a time
through hooks, so whatever transformers' forward computes, streaming computes too: support is a
question of measurement, not of porting. Each supported row was verified on a tiny random
checkpoint of that model_type (tests/models/families.py) against transformers' in-memory model:
float32 prompt logits, cached decode steps, greedy/sampled/batched generation and bfloat16 logits
and tokens (tests/models/test_family_parity.py). A refused row says what was found when that check
was run, so the reason is the verified one, not a guess from the architecture's description.

`extra_reads` marks types that stream correctly but cost more than one read of a layer per token:
a looped decoder runs the same layers several times per forward (each run of a streamed layer
reads it again), and hybrid layers that share one block's weights each read that block.

A model_type this table does not know (a transformers newer than `VERIFIED_TRANSFORMERS`) is
tried, with one warning at load saying it is unverified: refusing every new family until a release
of RabbitLLM lists it would refuse many that work, and a family that does not fit fails loudly at
load (no decoder-layer list, a weight that does not fit) rather than computing something else.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from packaging.version import InvalidVersion, Version
from transformers import PretrainedConfig

from rabbit_engine.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

#: The newest transformers every row was verified against (and the oldest, for min_transformers).
VERIFIED_TRANSFORMERS = "5.24.0"
OLDEST_TRANSFORMERS = "5.0.0"

#: What a supported row's tiny checkpoint was compared on (see the module docstring).
CHECKS = ("logits", "decode", "greedy", "bf16")


@dataclass(frozen=True)
class ModelSupport:
    """One model_type's row: supported (verified by `checks`) or refused (with `reason`)."""

    model_type: str
    supported: bool
    reason: str = ""  # refused: what was found; supported: why a check is missing, if one is
    checks: tuple[str, ...] = ()  # the parity checks a tiny checkpoint of this type passed
    min_transformers: str = OLDEST_TRANSFORMERS  # the first transformers it was verified on
    extra_reads: str = ""  # non-empty: why a token costs more than one read per layer
    adapter: str = ""  # a remote-code family: what rabbit_models.remote translates it into


def _ok(
    model_type: str,
    min_transformers: str = OLDEST_TRANSFORMERS,
    extra_reads: str = "",
    checks: tuple[str, ...] = CHECKS,
    reason: str = "",
):
    """A supported row; `checks` short of CHECKS says in `reason` why the rest could not run."""
    return ModelSupport(model_type, True, reason, checks, min_transformers, extra_reads)


def _no(model_type: str, reason: str, min_transformers: str = OLDEST_TRANSFORMERS):
    return ModelSupport(model_type, False, reason, (), min_transformers)


# Shared reasons (each was checked on a tiny checkpoint; see the module docstring).
_TOKENIZER_ALIAS = "tokenizer-only alias in transformers' mapping: the checkpoints' config is {}"

_ROWS: list[ModelSupport] = [
    # --- decoder-only text families (verified since the first release) ---
    *(
        _ok(t)
        for t in (
            "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 gemma3_text phi "
            "phi3 deepseek_v2 deepseek_v3 olmo2 granite starcoder2 olmo olmo3 helium smollm3 arcee "
            "seed_oss ministral ministral3 glm glm4 cohere cohere2 stablelm gpt_neox falcon "
            "exaone4 ernie4_5 hunyuan_v1_dense nemotron persimmon diffllama jais2 nanochat cwm "
            "vaultgemma bitnet olmoe flex_olmo granitemoe granitemoeshared phimoe jetmoe "
            "ernie4_5_moe hunyuan_v1_moe glm4_moe glm4_moe_lite minimax_m2 solar_open dots1 "
            "llama4_text gpt_oss afmoe aria_text longcat_flash gpt2 gpt_bigcode gpt_neo gptj "
            "codegen bloom opt mpt xglm biogpt gpt_neox_japanese ctrl modernbert-decoder"
        ).split()
    ),
    _ok("apertus", "5.1.0"),
    _ok("youtu", "5.1.0"),
    _ok("exaone_moe", "5.1.0"),
    _ok("gemma4_text", "5.5.0"),
    _ok("hy_v3", "5.6.0"),
    _ok("laguna", "5.7.0"),
    _ok("hyperclovax", "5.9.0"),
    _ok("cohere2_moe", "5.9.0"),
    _ok("gemma4_unified_text", "5.10.1"),
    _ok("mellum", "5.10.1"),
    _ok("mimo_v2_flash", "5.13.0"),
    _ok("minicpm3", "5.13.0"),
    _ok("granite_swa", "5.15.0"),
    _ok("granitemoe_swa", "5.15.0"),
    _ok("axk1", "5.15.0"),
    _ok("dbrx", "5.15.0"),
    _ok("doge", "5.18.0"),
    _ok("kolibri1", "5.20.0"),
    _ok("beam", "5.21.0"),
    _ok("flint", "5.21.0"),
    _ok("internlm3", "5.23.0"),
    _ok("iquestcoder", "5.23.0"),
    _ok("exaone", "5.24.0"),
    _ok("apertus1p5_text", "5.24.0"),
    _ok("sarvam_moe", "5.24.0"),
    _ok("sarvam_mla", "5.24.0"),
    # --- found to stream exactly by the support sweep (transformers 5.24.0): encoder LM heads,
    # decoder halves of encoder-decoder models, multimodal classes' text path, SSM/recurrent and
    # hybrid stacks, sparse-indexer attention. Verified on 5.24.0 only, so that is their minimum.
    *(
        _ok(t, VERIFIED_TRANSFORMERS)
        for t in (
            "axk2 bailing_hybrid bamba bart bert bert-generation big_bird bigbird_pegasus "
            "blenderbot blenderbot-small camembert cohere_compass_text cpmant data2vec-text "
            "deepseek_v32 deepseek_v4 dots3_note_text electra ernie falcon_h1 falcon_mamba "
            "fuyu gemma3 gemma3n_text gemma4 gemma4_unified git glm_moe_dsa got_ocr2 gpt-sw3 "
            "granitemoehybrid hy_v4 inkling2_loop_text inkling2_text inkling_text jamba "
            "kimi_linear lara_mini lfm2 lfm2_moe lfm3 llama4 mamba mamba2 marian mbart "
            "megatron-bert minimax minimax_m3_vl_text moshi moss_transcribe_diarize mvp "
            "nemotron_h olmo_hybrid openai-gpt pegasus phi4_multimodal plbart prophetnet "
            "qwen3_5 qwen3_5_moe qwen3_5_moe_text qwen3_5_text qwen3_next qwen4_exp "
            "qwen4_exp_text recurrent_gemma reformer rembert roberta roberta-prelayernorm "
            "roc_bert roformer rwkv trocr whisper xlm-roberta xlm-roberta-xl xlstm zaya "
            "mllama"
        ).split()
    ),
    _ok(
        "xlnet",
        VERIFIED_TRANSFORMERS,
        checks=("logits", "decode", "greedy"),
        reason="bf16 not verified: transformers' own XLNet fails in bf16 (einsum of float32 and "
        "bfloat16), and the streamed model fails the same way",
    ),
    *(
        _ok(
            t,
            VERIFIED_TRANSFORMERS,
            extra_reads="its hybrid layers share one attention block (zamba2: num_mem_blocks "
            "blocks), and each hybrid layer reads the shared block's weights again, so one "
            "token reads the same weights once per hybrid layer",
        )
        for t in ("zamba", "zamba2")
    ),
    _ok(
        "dory",
        VERIFIED_TRANSFORMERS,
        extra_reads="a looped decoder: its recurrent block of layers runs n_recurrent_loops times "
        "per token, and a streamed layer is read again for each run",
    ),
    # --- refused: what the sweep found ---
    _no("code_llama", _TOKENIZER_ALIAS.format("llama's (served as llama)")),
    _no(
        "blt",
        "Byte Latent Transformer: three layer stacks (byte-level local encoder and decoder around "
        "a patch-level global transformer); the engine streams one decoder-layer list and "
        "BltForCausalLM has none where transformers keeps one",
    ),
    _no(
        "hrm_text",
        "hierarchical reasoning model: two layer stacks (high and low level) that run "
        "H_cycles x (L_cycles + 1) times per token; the engine streams one decoder-layer list and "
        "HrmTextForCausalLM has none where transformers keeps one",
    ),
    *(
        _no(
            t,
            "multi-token-prediction drafter: its forward needs the target model's inputs_embeds "
            "and shared_kv_states (transformers raises 'inputs_embeds and shared_kv_states cannot "
            "be None' on token ids alone); it is not a stand-alone LM",
        )
        for t in ("gemma4_assistant", "gemma4_unified_assistant")
    ),
    *(
        _no(
            t,
            "audio model: transformers' causal-LM class for it is the audio-codebook decoder "
            f"alone, which cannot be built from a {t} config ('{cls}' object has no attribute "
            "'dropout'); it emits parallel codebook streams conditioned on a text encoder",
        )
        for t, cls in (("musicgen", "MusicgenConfig"), ("musicgen_melody", "MusicgenMelodyConfig"))
    ),
    _no(
        "xlm",
        "XLMWithLMHeadModel generates masked-LM style (generate() appends a mask token and "
        "predicts it at every step) and keeps no KV cache: not a causal LM; on a tiny random "
        "checkpoint transformers' own generate() repeats one token",
    ),
    _no(
        "xmod",
        "X-MOD picks a language adapter per input (lang_ids or set_default_language()); on token "
        "ids alone transformers raises 'Input language unknown'",
    ),
    _no(
        "emu3",
        "not verified: transformers' causal-LM class for it (Emu3ForCausalLM) is the text decoder "
        "alone and saves as model_type 'emu3_text_model', which transformers maps to no causal-LM "
        "class, and a full Emu3 model could not be built from a tiny config",
    ),
    _no(
        "dots3_note",
        "not verified: no tiny Dots3Note config could be built (its per-layer configuration is "
        "keyed to the layers of the released model); its text decoder is served as "
        "dots3_note_text",
    ),
    _no(
        "gemma3n",
        "not verified: building its vision tower (TimmWrapperModel) needs timm and pillow, which "
        "RabbitLLM does not depend on; its text decoder is served as gemma3n_text",
    ),
]


#: What a remote-code family's tiny checkpoint was compared on: the original upstream code's
#: float32 logits at every prompt position and cached decode step, and its greedy ids, loaded from
#: the original shards and from a split (tests/models/test_remote_code_families.py).
REMOTE_CHECKS = ("logits", "decode", "greedy", "split")
_ORIGINAL = "checked against the original code's outputs (../shared/fixtures/remote-code)"


def _remote(model_type: str, adapter: str, reason: str) -> ModelSupport:
    return ModelSupport(model_type, True, reason, REMOTE_CHECKS, OLDEST_TRANSFORMERS, "", adapter)


# Families whose hub checkpoints ship their own modeling code (model_types transformers does not
# know): streamed natively by rabbit_models.remote, with trust_remote_code=False.
_REMOTE_ROWS: list[ModelSupport] = [
    _remote(
        "internlm",
        "llama with q/k/v/o biases (config `bias`); keys as stored",
        f"InternLM v1, {_ORIGINAL}; a `rotary` of type 'dynamic' (later revisions) is exact up "
        "to max_position_embeddings and longer sequences are refused",
    ),
    _remote(
        "internlm2",
        "llama; wqkv split per KV group, feed_forward w1/w3/w2 as gate/up/down",
        f"InternLM2 and 2.5, {_ORIGINAL}; rope_scaling 'dynamic' is exact up to "
        "max_position_embeddings and longer sequences are refused; 'linear' is transformers' "
        "linear scaling (checked on a variant, not against the original code)",
    ),
    _remote(
        "qwen",
        "qwen2; c_attn split into q/k/v, mlp w2/w1/c_proj as gate/up/down",
        f"QWen v1, {_ORIGINAL}; dynamic NTK and logN scaling (use_dynamic_ntk, use_logn_attn) "
        "act only past seq_length, so longer sequences are refused; no_bias=false and "
        "rotary_pct<1 (no release uses them) are refused",
    ),
    _remote(
        "baichuan",
        "llama; W_pack split into q/k/v, Baichuan2's NormHead normalised once at load; ALiBi "
        "models (no max_position_embeddings in config.json) run a registered ALiBi attention",
        f"Baichuan2-7B (RoPE) and Baichuan2-13B (ALiBi), {_ORIGINAL}; Baichuan 1 (neither "
        "z_loss_weight nor Baichuan2's 125696-token vocabulary: a plain head) is checked on a "
        "variant against transformers' Llama, not against its original code",
    ),
    _remote(
        "chatglm",
        "glm; query_key_value split into q/k/v, dense_h_to_4h as gate_up",
        f"ChatGLM2 and ChatGLM3, {_ORIGINAL}; rope_ratio (the 32k/128k checkpoints) is read as "
        "rope base 10000*rope_ratio (checked on a variant, not against the original code); "
        "ChatGLM-6B v1 is another architecture",
    ),
]


def _table(rows: list[ModelSupport]) -> Mapping[str, ModelSupport]:
    table: dict[str, ModelSupport] = {}
    for row in rows:
        if row.model_type in table:  # one row per type: never both supported and refused
            raise ValueError(f"model_type {row.model_type!r} has two rows in the support table")
        table[row.model_type] = row
    return MappingProxyType(table)


SUPPORT: Mapping[str, ModelSupport] = _table(_ROWS)
#: Remote-code families (not transformers types, so apart from SUPPORT, which mirrors
#: transformers' causal-LM mapping and whose rows are checked against transformers' own models).
REMOTE_SUPPORT: Mapping[str, ModelSupport] = _table(_REMOTE_ROWS)


def support_for(model_type: str) -> ModelSupport | None:
    """The table's row for `model_type`, or None for a type it does not know."""
    return SUPPORT.get(model_type) or REMOTE_SUPPORT.get(model_type)


def refuse_unsupported(model_type: str | None) -> None:
    """Raise UnsupportedModelError for a type the table refuses; anything else passes.

    Takes the raw model_type so that a caller can refuse before transformers parses the config
    (a refused family's config may not even parse on this version)."""
    row = support_for(model_type) if model_type else None
    if row is not None and not row.supported:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported by RabbitLLM: {row.reason}."
        )


def check_supported(config: PretrainedConfig) -> ModelSupport | None:
    """Refuse a refused type (UnsupportedModelError), say the cost of a multi-read one, warn of
    an unknown one; called by `adapter_for` before any weight is read."""
    model_type = config.model_type
    row = support_for(model_type)
    if row is None:
        logger.warning(
            "model_type=%r is not in RabbitLLM's support table (verified against transformers "
            "%s..%s); trying it unverified: streaming runs transformers' own forward, which is "
            "correct when it runs each decoder layer once per token, in order.",
            model_type,
            OLDEST_TRANSFORMERS,
            VERIFIED_TRANSFORMERS,
        )
        return None
    refuse_unsupported(model_type)
    installed = _installed_transformers()
    if installed is not None and installed < Version(row.min_transformers):
        logger.warning(
            "model_type=%r was verified from transformers %s on; this is %s: trying it unverified.",
            model_type,
            row.min_transformers,
            installed,
        )
    if row.extra_reads:
        logger.warning(
            "model_type=%r streams correctly but costs more than one read per layer per token: %s.",
            model_type,
            row.extra_reads,
        )
    return row


def _installed_transformers() -> Version | None:
    import transformers

    try:
        return Version(transformers.__version__)
    except InvalidVersion:  # a source build with a local tag: nothing to compare
        return None


def markdown() -> str:
    """The README's families section, generated from this table (a test keeps the README equal)."""
    supported = [row for row in SUPPORT.values() if row.supported]
    refused = [row for row in SUPPORT.values() if not row.supported]
    by_version: dict[str, list[str]] = {}
    for row in supported:
        by_version.setdefault(row.min_transformers, []).append(row.model_type)
    intro = (
        "Verified on every CI run against transformers' own model, on a tiny random checkpoint "
        "of each type (tests/models/test_family_parity.py): float32 logits over a prompt and 10 "
        "decode steps, identical greedy, sampled and left-padded batched tokens, bf16 logits and "
        "greedy tokens; sharded and single-file checkpoints. The first issue's 17 core families "
        "run on every `pytest`, the rest under the `slow` marker (CI runs both). The table lives "
        f"in `rabbit_models.support`: {len(supported)} model_types supported, {len(refused)} "
        f"refused (checked up to transformers {VERIFIED_TRANSFORMERS}); a type's row says the "
        "first transformers it was verified on."
    )
    lines = [
        textwrap.fill(intro, 100, break_on_hyphens=False),
        "",
        "| from transformers | model_types |",
        "|---|---|",
    ]
    for version in sorted(by_version, key=Version):
        lines.append(f"| {version} | {', '.join(sorted(by_version[version]))} |")
    partial = [row for row in supported if row.reason]
    if partial:
        lines += ["", "**Supported with a check short**:", ""]
        lines += [_item(f"- {row.model_type}: {row.reason}") for row in partial]
    multi = [row for row in supported if row.extra_reads]
    if multi:
        lines += ["", "**Correct, but more than one read per layer per token** (said at load):", ""]
        lines += [_item(f"- {row.model_type}: {row.extra_reads}") for row in multi]
    reasons: dict[str, list[str]] = {}
    for row in refused:
        reasons.setdefault(row.reason, []).append(row.model_type)
    lines += ["", "**Refused** at load, before any weight is read (`UnsupportedModelError`):", ""]
    for reason, types in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[1])):
        lines.append(_item(f"- {', '.join(sorted(types))}: {reason}"))
    lines += [
        "",
        "A model_type not in the table (a newer transformers) is tried, with a warning that it "
        "is unverified.",
        "",
        textwrap.fill(
            "**Families whose checkpoints ship their own code**, streamed natively with "
            "`trust_remote_code=False` (no code from the checkpoint runs; `rabbit_models.remote` "
            "translates the config and maps the keys onto a transformers class, and the weights "
            "stream from the original shards). Variants beyond the fixtures (other head counts, "
            "KV groups, rope bases, biases on or off, sharded) are checked against transformers' "
            "own model of the same function. Checked on transformers "
            f"{OLDEST_TRANSFORMERS} and {VERIFIED_TRANSFORMERS}: " + ", ".join(REMOTE_CHECKS) + ".",
            100,
            break_on_hyphens=False,
        ),
        "",
        "| model_type | streamed as | verified, and limits |",
        "|---|---|---|",
    ]
    for row in REMOTE_SUPPORT.values():
        lines.append(f"| {row.model_type} | {row.adapter} | {row.reason} |")
    return "\n".join(lines)


def _item(text: str) -> str:
    return textwrap.fill(text, 100, subsequent_indent="  ", break_on_hyphens=False)
