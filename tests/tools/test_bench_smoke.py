"""`tools/bench.py --quick` end to end on a few-MB model: every engine runs in its own process, the
table is printed, and every engine's greedy tokens equal transformers'. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tools" / "bench.py"
ENGINES = ("rabbit", "rabbit-split", "rabbit-auto", "transformers", "accelerate")


@pytest.mark.slow
def test_bench_quick_prints_table_with_every_engine(tmp_path):
    pytest.importorskip("accelerate")
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out_json),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    table = proc.stdout
    assert "decode s/tok" in table and "tokens = tf" in table
    rows = [line.split() for line in table.splitlines()]
    seen = {(r[0], r[1]) for r in rows if len(r) > 2 and r[0] in ENGINES}
    for regime in ("cold", "warm", "resident"):
        for engine in ENGINES:
            if (regime == "resident" and engine == "accelerate") or (
                regime != "cold" and engine == "rabbit-auto"
            ):
                continue
            assert (engine, regime) in seen, f"no row for {engine} in the {regime} regime:\n{table}"
    assert "cold regime capping:" in table
    assert "FAILED" not in table

    data = json.loads(out_json.read_text())
    results = data["results"]
    assert results and all(r["ok"] for r in results)
    for r in results:
        assert r["tokens_equal"] is True, (
            f"{r['engine']} ({r['regime']}) tokens differ from transformers'"
        )
        assert len(r["tokens"]) == 1 + data["args"]["tokens"]
        assert r["decode_s"] > 0 and r["peak"]["VmHWM"] > 0
    assert data["regimes"]["cold"]["method"] in ("cgroup-v1", "cgroup-v2", "evict")
    auto = next(r for r in results if r["engine"] == "rabbit-auto")
    assert auto["streamer_stats"]["num_layers"] == 4 and "resident_layers" in auto["streamer_stats"]
    assert {g["goal"].split(":")[0] for g in data["goals"]} >= {"cold", "warm", "resident"}


def test_bench_checkpoint_facts_and_page_cache_helpers(tmp_path):
    """The generated checkpoint has the sizes its shape promises; the page-cache helpers run."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from bench import layer_facts, rss_bound
        from bench_lib import memcap
        from bench_lib.checkpoint import QUICK, checkpoint_files, make_checkpoint
    finally:
        sys.path.remove(str(ROOT / "tools"))
    path = make_checkpoint(QUICK, tmp_path, log=lambda *_: None)
    files = checkpoint_files(path)
    assert len(files) > 1  # sharded, like the hub's
    facts = layer_facts(files)
    assert facts["num_layers"] == QUICK.layers
    assert facts["total_bytes"] == QUICK.nbytes()
    assert facts["largest_layer"] == 2 * QUICK.layer_params()
    assert rss_bound(facts) > facts["resident_bytes"]
    memcap.evict_files(files)
    assert 0.0 <= memcap.resident_fraction(files) <= 1.0
    memcap.warm_files(files)
    bps, nbytes = memcap.read_bandwidth(files)
    assert nbytes == sum(f.stat().st_size for f in files) and bps > 0
    assert make_checkpoint(QUICK, tmp_path, log=lambda *_: None) == path  # cached
