"""The bench package (`python -m tools.rabbit_bench`): end to end on a few-MB model (every engine,
llama.cpp's and the compressed rows included), its checkpoint facts (read through rabbit_store),
its page-cache helpers on a real file, the engine-free read-path micro-benchmark, and that the
parent process stays free of torch. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.rabbit_bench.spec import ENGINES, LLAMACPP, LOSSY, REGIME_ENGINES

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the checkout's root, as the docs spell it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    from tools.rabbit_bench.checkpoint import QUICK, make_checkpoint

    return make_checkpoint(QUICK, tmp_path_factory.mktemp("ckpt"), log=lambda *_: None)


@pytest.mark.slow
def test_bench_quick_prints_table_with_every_engine(tmp_path):
    pytest.importorskip("accelerate")
    out_json = tmp_path / "bench.json"
    work = str(tmp_path / "work")
    proc = run_module(
        "tools.rabbit_bench",
        "--quick",
        "--workdir",
        work,
        "--json",
        str(out_json),
        "--threads",
        "1",
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    table = proc.stdout
    assert "decode s/tok" in table and "tokens = tf" in table
    rows = [line.split() for line in table.splitlines()]
    seen = {(r[0], r[1]) for r in rows if len(r) > 2 and r[0] in ENGINES}
    for regime, engines in REGIME_ENGINES.items():
        for engine in engines:
            assert (engine, regime) in seen, f"no row for {engine} in the {regime} regime:\n{table}"
    assert "cold regime capping:" in table
    assert "floor[cold]:" in table and "floor[warm]: transformers in memory" in table
    assert "FAILED" not in table

    data = json.loads(out_json.read_text())
    results = data["results"]
    assert results and all(r["ok"] for r in results)
    for r in results:
        assert len(r["tokens"]) == 1 + data["args"]["tokens"]
        assert r["decode_s"] > 0 and r["peak"]["VmHWM"] > 0
        if r["engine"] in LOSSY:  # other weights (compressed, GGUF): close, not equal
            assert r["stream_bytes"] > 0 and r["ratio"] > 0
            continue
        assert r["tokens_equal"] is True, (
            f"{r['engine']} ({r['regime']}) tokens differ from transformers'"
        )
        assert r["max_abs_logit_diff"] == 0.0
    for engine in LLAMACPP:  # each GGUF passed its check against transformers
        check = data["artifacts"][engine]["check"]
        assert check["top1_agree"] >= check["positions_decided"] > 0
    assert not data["artifact_errors"]
    assert data["regimes"]["cold"]["method"] in ("cgroup-v1", "cgroup-v2", "evict")
    auto = next(r for r in results if r["engine"] == "rabbit-auto")
    assert auto["streamer_stats"]["num_layers"] == 4 and "resident_layers" in auto["streamer_stats"]
    assert {g["goal"].split(":")[0] for g in data["goals"]} >= {"cold", "warm", "resident"}
    goals = [g["goal"] for g in data["goals"]]
    assert "cold: rabbit-4bit >= 1.6x faster than llamacpp-q4_0" in goals
    assert "warm: rabbit-8bit decode <= 1.15 x its own floor" in goals


def test_checkpoint_facts_come_from_the_store(quick_checkpoint):
    """The generated checkpoint has the sizes its shape promises, as rabbit_store groups it."""
    from tools.rabbit_bench.checkpoint import QUICK, checkpoint_files, layer_facts, make_checkpoint
    from tools.rabbit_bench.goals import rss_bound

    files = checkpoint_files(quick_checkpoint)
    assert len(files) > 1 and all(f.is_file() for f in files)  # sharded, like the hub's
    facts = layer_facts(quick_checkpoint)
    assert facts["num_layers"] == QUICK.layers
    assert facts["total_bytes"] == QUICK.nbytes()
    assert facts["layer_sizes"] == [2 * QUICK.layer_params()] * QUICK.layers
    assert facts["largest_layer"] == 2 * QUICK.layer_params()
    assert facts["resident_bytes"] == 2 * QUICK.resident_params()
    assert rss_bound(facts) == facts["resident_bytes"] + 3 * facts["largest_layer"] + 300 * 10**6
    again = make_checkpoint(QUICK, quick_checkpoint.parent, log=lambda *_: None)
    assert again == quick_checkpoint  # cached


def test_page_cache_helpers_evict_and_warm_a_real_file(tmp_path):
    """resident_fraction (mincore) reads ~0 once the file is evicted (posix_fadvise DONTNEED) and
    ~1 once it has been read back; read_bandwidth reads every byte."""
    from tools.rabbit_bench import memcap

    path = tmp_path / "blob.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED can drop them
    files = [str(path)]
    memcap.evict_files(files)
    assert memcap.resident_fraction(files) < 0.05
    memcap.warm_files(files)
    assert memcap.resident_fraction(files) > 0.95
    bps, nbytes = memcap.read_bandwidth(files)  # evicts first, then reads it all
    assert nbytes == path.stat().st_size and bps > 0
    memcap.evict_files(files)
    assert memcap.resident_fraction(files) < 0.05


def test_the_parent_never_imports_torch():
    """Children import torch; the parent must not (its RSS and page cache would blur the
    measurements, and it would take seconds per run). rabbit_engine.cgroup must stay torch-free."""
    code = (
        "import sys; import tools.rabbit_bench.cli, tools.rabbit_bench.readpaths, "
        "tools.rabbit_bench.memcap; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_runs_rotate_and_regimes_keep_their_engines():
    from tools.rabbit_bench.spec import parse_choices, run_order

    wanted = ["rabbit", "accelerate", "transformers", "rabbit-auto"]
    assert run_order("cold", wanted, 0) == ["transformers", "rabbit", "rabbit-auto", "accelerate"]
    assert run_order("cold", wanted, 1) == ["rabbit", "rabbit-auto", "accelerate", "transformers"]
    assert run_order("resident", wanted, 0) == ["transformers", "rabbit"]
    assert run_order("warm", ["rabbit-auto"], 0) == []
    assert parse_choices("1,warm", ("cold", "warm"), "regime", {"1": "cold"}) == ["cold", "warm"]
    with pytest.raises(SystemExit, match="unknown engine 'vllm'"):
        parse_choices("vllm", ("rabbit",), "engine")


def test_ratios_and_goals_against_the_floors():
    """A cold row that kept layers resident is judged against the bytes it streamed; a slow warm
    row misses its goal; tokens that differ from transformers' are a missed goal too."""
    from tools.rabbit_bench.goals import evaluate, set_ratios

    facts = {
        "layer_sizes": [100, 100, 100, 100],
        "layer_bytes": 400,
        "largest_layer": 100,
        "resident_bytes": 50,
    }
    regimes = {
        "cold": {"name": "cold", "floor_s": 4.0, "read_bps": 100.0},
        "warm": {"name": "warm", "floor_s": 1.0},
    }

    def row(engine, regime, decode_s, tokens=(1, 2), **extra):
        per_step = {"cpu_user_s": decode_s, "cpu_sys_s": 0.0}
        return {
            "engine": engine,
            "regime": regime,
            "ok": True,
            "decode_s": decode_s,
            "tokens": list(tokens),
            "logits_path": "/nonexistent",
            "vocab": 2,
            "per_step": per_step,
            "peak": {"RssAnon": 10},
            **extra,
        }

    results = [
        row("transformers", "warm", 1.0),
        row("rabbit", "warm", 1.5),
        row("transformers", "cold", 8.0),
        row("rabbit-auto", "cold", 2.0, streamer_stats={"resident_layers": [0, 1]}),
        row("accelerate", "cold", 6.0, tokens=(1, 3)),
    ]
    ref = set_ratios(results, regimes, facts)
    assert ref is results[0]  # the in-memory transformers run is the reference
    by = {(r["engine"], r["regime"]): r for r in results}
    auto = by[("rabbit-auto", "cold")]
    assert auto["streamed_bytes"] == 200 and auto["floor_s"] == 2.0 and auto["ratio"] == 1.0
    assert by[("rabbit", "warm")]["ratio"] == 1.5 and by[("rabbit", "warm")]["cpu_ratio"] == 1.5
    assert by[("accelerate", "cold")]["tokens_equal"] is False
    met = {g["goal"]: g["met"] for g in evaluate(results, regimes, facts)}
    assert met["cold: rabbit-auto decode <= 1.15 x floor"] is True
    assert met["cold: rabbit-auto >= 2x faster than accelerate disk offload"] is True
    assert met["warm: rabbit decode <= 1.15 x floor"] is False
    assert met["cold: accelerate tokens equal to transformers'"] is False


@pytest.mark.slow
def test_readpaths_modes_run_on_a_small_checkpoint(quick_checkpoint):
    """The engine-free micro-benchmark: one row per mode asked for, none failed."""
    modes = "fault-file,populate-ctypes,pread,pread-cache-forward,willneed-inline-forward"
    proc = run_module(
        "tools.rabbit_bench.readpaths",
        str(quick_checkpoint),
        "--warm",
        "--tokens",
        "2",
        "--modes",
        modes,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[2:] if line.strip()}
    for mode in modes.split(","):
        assert mode in lines and "failed" not in lines[mode], proc.stdout
        assert float(lines[mode].split()[1]) > 0
    unknown = run_module("tools.rabbit_bench.readpaths", str(quick_checkpoint), "--modes", "nope")
    assert unknown.returncode == 2 and "unknown mode(s) nope" in unknown.stderr
