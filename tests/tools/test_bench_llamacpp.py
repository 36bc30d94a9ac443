"""The bench's peer and compressed rows: the GGUF writer (checked against transformers' own GGUF
loader and against llama.cpp's logits), the llama.cpp runtime on this machine's glibc, the new
engine names, and issue 11's goals computed from a table of results."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tools.rabbit_bench import gguf_export
from tools.rabbit_bench.checkpoint import Shape, make_checkpoint

#: Tiny, but with GQA (the k_proj permutation uses the key/value head count) and rows that fill
#: whole 32-value quantization blocks.
TINY = Shape(hidden=64, layers=2, intermediate=128, vocab=320, heads=4, kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(TINY, tmp_path_factory.mktemp("ckpt"), log=lambda *_: None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llamacpp")


@pytest.mark.parametrize("kind", ["bf16", "q8_0", "q4_0"])
def test_llamacpp_agrees_with_transformers_on_the_written_gguf(tiny, cache, tmp_path, kind):
    """check_gguf passes (weights read back by transformers' loader, llama.cpp's top-1 equal to
    transformers' on the file), and the file's llama.cpp logits agree with transformers' on the
    *source* checkpoint too: the same top-1 token at every position of a prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from tools.rabbit_bench.llamacpp import LlamaCppModel

    dest = tmp_path / f"tiny-{kind}.gguf"
    result = gguf_export.export_and_check(tiny, dest, kind, cache=cache, threads=1)
    assert dest.is_file() and not dest.with_name(dest.stem + ".unchecked.gguf").exists()
    assert result["top1_agree"] == result["positions"] == gguf_export.CHECK_PROMPT
    assert result["weights_max_share_of_block_amax"] <= gguf_export.WEIGHT_TOLERANCE[kind]
    if kind == "bf16":
        assert result["weights_max_share_of_block_amax"] == 0.0

    ids = [5, 17, 300, 42, 7, 99, 250, 3, 64, 128]
    source = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with torch.inference_mode():
        want = source(input_ids=torch.tensor([ids])).logits[0]
    llm = LlamaCppModel(dest, cache=cache, n_ctx=32, threads=1)
    try:
        got = torch.tensor([list(r) for r in llm.decode(ids, all_logits=True)])
        assert llm.n_vocab == TINY.vocab
    finally:
        llm.close()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() < 0.1 * want.std().item()


def test_a_file_without_the_rope_permutation_fails_its_check(tiny, cache, tmp_path, monkeypatch):
    """The check is no formality: q/k rows left in transformers' order are caught (transformers'
    loader undoes a permutation that was never done, so the weights come back wrong)."""
    monkeypatch.setattr(gguf_export, "permute_for_rope", lambda weight, n_heads: weight)
    dest = tmp_path / "wrong.gguf"
    with pytest.raises(gguf_export.GGUFCheckError, match=r"self_attn\.[qk]_proj.*wrong row order"):
        gguf_export.export_and_check(tiny, dest, "bf16", cache=cache, threads=1)
    assert not dest.exists() and not dest.with_name("wrong.unchecked.gguf").exists()


def test_rope_permutation_interleaves_each_heads_halves():
    import numpy as np

    w = np.arange(16, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows
    out = gguf_export.permute_for_rope(w, 2)
    # per head: rows [0, 1 | 2, 3] -> [0, 2, 1, 3]
    assert out[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    with pytest.raises(gguf_export.GGUFExportError, match="cannot be split into 3 heads"):
        gguf_export.permute_for_rope(w, 3)


def test_the_gguf_keeps_forward_order_and_the_kept_types(tiny, tmp_path):
    """Tensors in the order a token computes them; only decoder-layer matrices quantized; the
    streamed bytes are every tensor but the embedding table."""
    import gguf

    dest = gguf_export.write_gguf(tiny, tmp_path / "q4.gguf", "q4_0")
    reader = gguf.GGUFReader(str(dest))
    names = [t.name for t in reader.tensors]
    assert names[0] == "token_embd.weight" and names[-2:] == ["output_norm.weight", "output.weight"]
    assert names[1:10] == [
        f"blk.0.{p}.weight"
        for p in (
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
    ]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_k.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["output.weight"] == "BF16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    sizes = gguf_export.tensor_bytes(dest)
    assert gguf_export.streamed_bytes(dest) == sum(sizes.values()) - sizes["token_embd.weight"]
    assert sizes["output.weight"] == 2 * TINY.vocab * TINY.hidden


def test_bad_exports_are_refused_by_name(tiny, tmp_path):
    with pytest.raises(gguf_export.GGUFExportError, match="GGUF kind 'q5_k'; choose from"):
        gguf_export.write_gguf(tiny, tmp_path / "x.gguf", "q5_k")
    small = make_checkpoint(
        Shape(hidden=64, layers=1, intermediate=128, vocab=100, heads=4, kv_heads=2),
        tmp_path,
        log=lambda *_: None,
    )
    with pytest.raises(gguf_export.GGUFExportError, match="vocab_size 100: .* needs >= 259"):
        gguf_export.write_gguf(small, tmp_path / "y.gguf", "bf16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_weakening_the_glibc_version_need_is_exact(tmp_path):
    """The runtime's ELF edit flips only the GLIBC_2.38 need's flags, and is idempotent."""
    from tools.rabbit_bench import llamacpp

    lib = next(llamacpp.package_dir().glob("libggml-base.so*"))
    copy = tmp_path / lib.name
    shutil.copy2(lib, copy)
    before = copy.read_bytes()
    changed = llamacpp.weaken_version_need(copy)
    after = copy.read_bytes()
    if b"GLIBC_2.38" in before:
        assert changed == 1
        diff = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert len(diff) == 1 and after[diff[0]] == before[diff[0]] | llamacpp.VER_FLG_WEAK
    else:
        assert changed == 0 and after == before
    assert llamacpp.weaken_version_need(copy) == 0
    (tmp_path / "not-elf").write_bytes(struct.pack("<4s", b"abcd") * 20)
    with pytest.raises(llamacpp.LlamaCppError, match="not-elf: not a little-endian 64-bit ELF"):
        llamacpp.weaken_version_need(tmp_path / "not-elf")


def test_new_engine_names_are_parsed_and_ordered():
    from tools.rabbit_bench.spec import ENGINES, LOSSY, parse_choices, prompt_ids, run_order

    wanted = parse_choices(
        "llamacpp-q4_0,rabbit-4bit,transformers,rabbit-8bit,llamacpp-bf16,rabbit", ENGINES, "engine"
    )
    assert run_order("cold", wanted, 0) == [
        "transformers",
        "rabbit",
        "rabbit-8bit",
        "rabbit-4bit",
        "llamacpp-bf16",
        "llamacpp-q4_0",
    ]
    assert run_order("resident", wanted, 0) == [
        "transformers",
        "rabbit",
        "rabbit-8bit",
        "rabbit-4bit",
    ]
    assert run_order("warm", wanted, 1)[-1] == "transformers"
    assert set(LOSSY) == {"rabbit-8bit", "rabbit-4bit"} | {
        e for e in ENGINES if e.startswith("llamacpp-")
    }
    with pytest.raises(SystemExit, match="unknown engine 'llamacpp-q5_k'"):
        parse_choices("llamacpp-q5_k", ENGINES, "engine")
    ids = prompt_ids(320, 16, 0)
    assert ids == prompt_ids(320, 16, 0) and len(ids) == 16 and all(3 <= i < 320 for i in ids)


def _row(engine, regime, decode_s, **extra):
    return {
        "engine": engine,
        "regime": regime,
        "ok": True,
        "decode_s": decode_s,
        "tokens": [1, 2],
        "logits_path": "/nonexistent",
        "vocab": 2,
        "per_step": {"cpu_user_s": decode_s, "cpu_sys_s": 0.0},
        "peak": {"RssAnon": 100 * 10**6},
        **extra,
    }


def test_compressed_goals_from_a_table():
    """Each compressed row against its own floor (the larger of its bytes / bandwidth and its
    in-memory step), bf16 streaming, and llama.cpp at equal bits; a failed peer is a listed miss."""
    from tools.rabbit_bench.goals import evaluate, set_ratios

    facts = {"layer_sizes": [400, 400], "layer_bytes": 800, "largest_layer": 400}
    facts["resident_bytes"] = 10
    regimes = {
        "cold": {"name": "cold", "floor_s": 8.0, "read_bps": 100.0},
        "warm": {"name": "warm", "floor_s": 1.0},
        "resident": {"name": "resident", "floor_s": 1.0},
    }
    own8 = {"layer_bytes": 400, "largest_layer": 200, "resident_bytes": 10, "layer_sizes": []}
    own4 = {"layer_bytes": 200, "largest_layer": 100, "resident_bytes": 10, "layer_sizes": []}
    results = [
        _row("transformers", "warm", 1.0),
        _row("rabbit", "cold", 9.0),
        _row("rabbit-8bit", "cold", 4.5, stream_bytes=400, own_facts=own8),
        _row("rabbit-4bit", "cold", 3.0, stream_bytes=200, own_facts=own4),
        _row("rabbit-8bit", "warm", 0.5, stream_bytes=400, own_facts=own8),
        _row("rabbit-4bit", "warm", 0.45, stream_bytes=200, own_facts=own4),
        _row("rabbit-8bit", "resident", 0.48, stream_bytes=400, own_facts=own8),
        _row("rabbit-4bit", "resident", 2.5, stream_bytes=200, own_facts=own4),
        _row("llamacpp-q8_0", "cold", 9.0, stream_bytes=500),
        _row("llamacpp-q8_0", "warm", 0.4, stream_bytes=500),
        {"engine": "llamacpp-q4_0", "regime": "cold", "ok": False, "error": "boom"},
        _row("llamacpp-q4_0", "warm", 0.2, stream_bytes=300),
    ]
    set_ratios(results, regimes, facts)
    by = {(r["engine"], r["regime"]): r for r in results}
    c8, c4 = by[("rabbit-8bit", "cold")], by[("rabbit-4bit", "cold")]
    assert c8["floor_io_s"] == 4.0 and c8["floor_compute_s"] == 0.48 and c8["floor_s"] == 4.0
    assert c4["floor_io_s"] == 2.0 and c4["floor_s"] == 2.5  # compute-bound: its resident step
    assert c8["ratio"] == pytest.approx(4.5 / 4.0) and c4["ratio"] == pytest.approx(3.0 / 2.5)
    assert by[("rabbit-8bit", "warm")]["ratio"] == pytest.approx(0.5 / 0.48)
    q8 = by[("llamacpp-q8_0", "cold")]
    assert q8["floor_io_s"] == 5.0 and q8["floor_compute_s"] == 0.4 and q8["ratio"] == 1.8
    assert by[("llamacpp-q8_0", "warm")]["ratio"] == 0.4  # the regime's floor: transformers'

    goals = {g["goal"]: g for g in evaluate(results, regimes, facts)}

    def check(text, value, met):
        g = goals[text]
        assert g["met"] is met, g
        assert (g["value"] is None) if value is None else g["value"] == pytest.approx(value)

    check("cold: rabbit-8bit decode <= 1.2 x its own floor", 4.5 / 4.0, True)
    check("cold: rabbit-4bit decode <= 1.2 x its own floor", 3.0 / 2.5, True)
    check("warm: rabbit-8bit decode <= 1.15 x its own floor", 0.5 / 0.48, True)
    check("warm: rabbit-4bit decode <= 1.15 x its own floor", 0.45 / 2.5, True)
    check("cold: rabbit-8bit >= 1.7x faster than bf16 streaming (rabbit)", 2.0, True)
    check("cold: rabbit-4bit >= 2.8x faster than bf16 streaming (rabbit)", 3.0, True)
    check("cold: rabbit-8bit >= 1.6x faster than llamacpp-q8_0", 2.0, True)
    check("cold: rabbit-4bit >= 1.6x faster than llamacpp-q4_0", None, False)
    assert (
        "llamacpp-q4_0 did not run"
        in goals["cold: rabbit-4bit >= 1.6x faster than llamacpp-q4_0"]["why"]
    )
    check("warm: rabbit-8bit decode <= 1.5 x llamacpp-q8_0's", 0.5 / 0.4, True)
    check("warm: rabbit-4bit decode <= 1.5 x llamacpp-q4_0's", 0.45 / 0.2, False)
    # 100 MB peak anon: within 10 B + 3 x 200 B + 300 MB
    check("cold: rabbit-8bit peak anon RSS <= bound (300 MB)", 100.0, True)
    # lossy rows may differ in tokens without a "tokens equal" miss
    assert not any("tokens equal" in text for text in goals)


def test_a_compressed_warm_row_without_the_resident_regime_is_a_listed_miss():
    from tools.rabbit_bench.goals import evaluate, set_ratios

    facts = {"layer_sizes": [4], "layer_bytes": 4, "largest_layer": 4, "resident_bytes": 1}
    regimes = {"warm": {"name": "warm", "floor_s": 1.0}}
    own = {"layer_bytes": 2, "largest_layer": 2, "resident_bytes": 1, "layer_sizes": []}
    results = [
        _row("transformers", "warm", 1.0),
        _row("rabbit-8bit", "warm", 0.5, stream_bytes=2, own_facts=own),
    ]
    set_ratios(results, regimes, facts)
    goal = next(g for g in evaluate(results, regimes, facts) if "its own floor" in g["goal"])
    assert goal["met"] is False and goal["value"] is None
    assert "needs the resident regime" in goal["why"]
