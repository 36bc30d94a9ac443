"""The bench checkpoint as GGUF, for the llama.cpp rows: BF16, Q8_0 or Q4_0, written with gguf-py.

What llama.cpp's own converter would write for a Hugging Face Llama, made here from the
checkpoint's safetensors:

- Tensors in forward order (embedding, each block's attention then MLP, final norm, head): a
  page-cache streamer reads a file in the order it computes, so the order is part of the speed.
- q_proj/k_proj rows permuted per head: transformers' Llama rotates the two *halves* of each
  head's dimensions, llama.cpp's "normal" rope rotates *adjacent pairs*, so row i of the first
  half goes to row 2i and row i of the second half to row 2i+1 (k_proj per key/value head).
- The decoder layers' linear weights in the file's type; norms in F32 (llama.cpp wants them so);
  embedding and head in BF16 in every file, as RabbitLLM's compressed splits keep them, so that
  rows "at equal bits" compare the same bytes.
- A placeholder SentencePiece vocabulary (the bench feeds token ids, never text): <unk>, <s>,
  </s>, the 256 byte tokens, then numbered ones up to the model's vocabulary size.

Runs in a child process (it imports torch to read bf16 safetensors); the parent only asks for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Engine suffix -> (GGML tensor type name, llama file type name).
GGUF_KINDS = {
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
#: Tokens before the numbered ones of the placeholder vocabulary.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
MIN_VOCAB = len(SPECIAL_TOKENS) + 256


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as a llama.cpp GGUF (the message names what)."""


def gguf_path(ckpt: Path, kind: str, root: Path) -> Path:
    return root / f"{ckpt.name}-{kind}.gguf"


def permute_for_rope(weight, n_heads: int):
    """Rows of a q_proj/k_proj weight [n_heads * head_dim, in] from transformers' half-split rope
    layout to llama.cpp's interleaved one (a numpy array in, a numpy array out)."""
    import numpy as np

    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFExportError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    heads = weight.reshape(n_heads, 2, half, *weight.shape[1:])
    # [head, half-index, row-in-half] -> [head, row-in-half, half-index]: pairs become adjacent
    return np.ascontiguousarray(np.swapaxes(heads, 1, 2)).reshape(weight.shape)


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    import gguf

    if n < MIN_VOCAB:
        raise GGUFExportError(f"vocab_size {n}: the placeholder vocabulary needs >= {MIN_VOCAB}")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = [*SPECIAL_TOKENS, *byte_tokens]
    tokens += [f"tok{i}" for i in range(len(tokens), n)]
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256
    types += [int(gguf.TokenType.NORMAL)] * (n - len(types))
    scores = [0.0] * len(SPECIAL_TOKENS) + [0.0] * 256 + [-float(i) for i in range(n - MIN_VOCAB)]
    return tokens, scores, types


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise GGUFExportError(f"rope_type {params['rope_type']!r}: only plain rope is written")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def write_gguf(ckpt: Path, dest: Path, kind: str) -> Path:
    """Write `ckpt` (a Hugging Face Llama directory, safetensors) as `dest` in `kind`'s type."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    from .checkpoint import checkpoint_files

    if kind not in GGUF_KINDS:
        raise GGUFExportError(f"GGUF kind {kind!r}; choose from {', '.join(GGUF_KINDS)}")
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise GGUFExportError(
            f"{ckpt / 'config.json'}: model_type {cfg.get('model_type')!r}, "
            "only llama is written as GGUF"
        )
    qtype = gguf.GGMLQuantizationType[GGUF_KINDS[kind][0]]
    n_layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    if head_dim * n_heads != hidden:
        raise GGUFExportError(f"{ckpt}: head_dim {head_dim} x {n_heads} heads != hidden {hidden}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    tensors: dict[str, tuple[str, str]] = {}  # hf name -> (file, gguf name)
    for f in checkpoint_files(ckpt):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"{f}: tensor {key} has no llama.cpp name")
                tensors[key] = (str(f), name)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]

    def order(item):  # forward order: embedding, blocks (attention, then MLP), norm, head
        gname = item[1][1]
        if gname.startswith("token_embd"):
            return (0, 0, 0)
        if gname.startswith("blk."):
            _, layer, part = gname.split(".", 2)
            parts = (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
            rank = next((i for i, p in enumerate(parts) if part.startswith(p + ".")), len(parts))
            return (1, int(layer), rank)
        return (2, 0 if gname.startswith("output_norm") else 1, 0)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_name(ckpt.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(int(gguf.LlamaFileType[GGUF_KINDS[kind][1]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = _vocab(cfg["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    for key, (fname, gname) in sorted(tensors.items(), key=order):
        with safe_open(fname, framework="pt") as st:
            t = st.get_tensor(key)
        if gname.startswith("blk.") and gname.endswith("attn_q.weight"):
            t = torch.from_numpy(permute_for_rope(t.float().numpy(), n_heads))
        elif gname.startswith("blk.") and gname.endswith("attn_k.weight"):
            t = torch.from_numpy(permute_for_rope(t.float().numpy(), n_kv))
        if t.ndim == 1:  # norms (and biases): F32
            writer.add_tensor(gname, t.float().numpy())
        elif qtype == gguf.GGMLQuantizationType.BF16 or not gname.startswith("blk."):
            raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(
                gname, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16
            )
        else:
            if t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                raise GGUFExportError(
                    f"{fname}: {key} rows of {t.shape[-1]} do not fill whole {qtype.name} blocks"
                )
            packed = gguf.quants.quantize(t.float().numpy(), qtype)
            writer.add_tensor(gname, packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    logger.info("wrote %s (%.1f MB)", dest, dest.stat().st_size / 1e6)
    return dest


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor's data in a GGUF file (gguf-py's reader, no torch)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: int(t.n_bytes) for t in reader.tensors}


def streamed_bytes(path: Path) -> int:
    """What llama.cpp reads from a cold file per decode step: every tensor but the embedding
    table (of which it reads one row)."""
    return sum(n for name, n in tensor_bytes(path).items() if not name.startswith("token_embd"))


#: Per 32-value block, the largest |file - checkpoint| a correct file can show, as a share of the
#: block's largest |weight|: Q8_0 rounds to amax/127 steps (half a step, plus the fp16 scale's
#: rounding), Q4_0 to amax/8 steps (half a step, and the top code is clipped to +7 steps).
WEIGHT_TOLERANCE = {"bf16": 0.0, "q8_0": 0.6 / 127, "q4_0": 1.6 / 8}
#: Prompt positions compared: enough that many have a top-2 margin numerics cannot flip.
CHECK_PROMPT = 32


class GGUFCheckError(GGUFExportError):
    """A written GGUF does not hold the checkpoint, or llama.cpp does not compute what
    transformers computes from it."""


#: How far llama.cpp's logits may be from transformers' on the same GGUF, as a share of the
#: logits' standard deviation. Not zero: llama.cpp also quantizes the activations to 8 bits inside
#: its Q8_0/Q4_0 dot products while transformers dequantizes the weights and computes in float32
#: (measured on the 2 GB bench model, 20 layers: 0.037 x for BF16, 0.136 x for Q8_0, top-1 equal
#: at every position). A wrong row order or block layout moves logits by about the spread itself.
LOGIT_SPREAD_SHARE = 0.25


def check_gguf(ckpt: Path, path: Path, kind: str, *, cache: Path, threads: int) -> dict:
    """Two independent checks of a written file, raising GGUFCheckError on either:

    1. transformers' own GGUF loader (which undoes llama.cpp's q/k row order itself) reads back
       the checkpoint's weights: exactly for BF16 and for the tensors kept in BF16/F32, within
       the quantization step for Q8_0/Q4_0 (WEIGHT_TOLERANCE).
    2. llama.cpp's logits on a short prompt agree with transformers' on the same file: the same
       top-1 token at every position where transformers' top-2 margin exceeds twice the largest
       logit difference seen (where numerics alone could not flip it; at least one such position),
       with that difference under a quarter of the logits' spread (LOGIT_SPREAD_SHARE).
    """
    import random

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from .checkpoint import checkpoint_files
    from .llamacpp import LlamaCppModel

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    state = model.state_dict()
    tol = WEIGHT_TOLERANCE[kind]
    worst = 0.0
    for f in checkpoint_files(ckpt):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                if key not in state:
                    raise GGUFCheckError(f"{path}: transformers finds no {key} in it")
                want = st.get_tensor(key).float()
                got = state[key]
                if got.shape != want.shape:
                    raise GGUFCheckError(
                        f"{path}: {key} has shape {tuple(got.shape)}, the "
                        f"checkpoint's is {tuple(want.shape)}"
                    )
                quantized = want.ndim == 2 and ".layers." in key and tol > 0
                if not quantized:
                    if not torch.equal(got, want):
                        diff = (got - want).abs().max().item()
                        raise GGUFCheckError(
                            f"{path}: {key} differs from the checkpoint's (max |diff| "
                            f"{diff:.3g}; a {kind} file keeps it unchanged): wrong row order or "
                            "values"
                        )
                    continue
                blocks_w = want.reshape(-1, 32)
                excess = (got.reshape(-1, 32) - blocks_w).abs() / blocks_w.abs().amax(
                    dim=1, keepdim=True
                ).clamp_min(1e-30)
                share = excess.max().item()
                worst = max(worst, share)
                if share > tol:
                    raise GGUFCheckError(
                        f"{path}: {key} differs from the checkpoint's by {share:.3f} of a block's "
                        f"largest weight (a {kind} file allows {tol:.4f}): wrong row order or "
                        "quantization"
                    )
    vocab = model.config.vocab_size
    rng = random.Random(1234)
    ids = [rng.randrange(3, vocab) for _ in range(CHECK_PROMPT)]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0].float()
    del model, state
    llm = LlamaCppModel(path, cache=cache, n_ctx=CHECK_PROMPT + 8, threads=threads)
    try:
        mine = torch.tensor([list(row) for row in llm.decode(ids, all_logits=True)])
    finally:
        llm.close()
    max_diff = (mine - ref).abs().max().item()
    spread = ref.std().item()
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * max_diff
    agree = mine.argmax(-1) == ref.argmax(-1)
    result = {
        "kind": kind,
        "weights_max_share_of_block_amax": worst,
        "logits_max_abs_diff": max_diff,
        "logits_std": spread,
        "positions": len(ids),
        "positions_decided": int(decided.sum()),
        "top1_agree": int(agree.sum()),
    }
    if (
        max_diff > LOGIT_SPREAD_SHARE * spread
        or not bool(agree[decided].all())
        or not bool(decided.any())
    ):
        raise GGUFCheckError(
            f"{path}: llama.cpp's logits disagree with transformers' on the same file "
            f"(top-1 equal at {result['top1_agree']}/{len(ids)} positions, "
            f"{result['positions_decided']} decided; max |dlogit| {max_diff:.3g} vs logit std "
            f"{spread:.3g})"
        )
    return result


def export_and_check(ckpt: Path, dest: Path, kind: str, *, cache: Path, threads: int) -> dict:
    """Write `dest` and check it (check_gguf); the file only takes its name once it passed, with
    the check's numbers beside it in `dest`.check.json."""
    staging = dest.with_name(dest.stem + ".unchecked.gguf")
    write_gguf(ckpt, staging, kind)
    try:
        result = check_gguf(ckpt, staging, kind, cache=cache, threads=threads)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, dest)
    dest.with_name(dest.name + ".check.json").write_text(json.dumps(result, indent=2))
    return result
