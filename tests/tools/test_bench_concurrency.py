"""`python -m tools.rabbit_bench --concurrency`: C equal requests through the batch scheduler on one
streamed model. End to end on the few-MB model (its table, its JSON, and passes per token falling as
C rises: a behaviour of batching, not a timing), plus the level parsing and the ratios in process.
"""

from __future__ import annotations

import json

import pytest

from tests.tools.test_bench_smoke import run_module
from tools.rabbit_bench.concurrency import goals, parse_levels, set_ratios


@pytest.mark.slow
def test_concurrency_rows_share_passes(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = run_module(
        "tools.rabbit_bench",
        "--quick",
        "--engines",
        "rabbit",
        "--regimes",
        "cold,warm",
        "--concurrency",
        "4,2",
        "--tokens",
        "6",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out_json),
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    table = proc.stdout.split("\nconcurrency: ", 1)[1].splitlines()
    assert table[1].split() == [
        "regime", "streams", "tokens", "first", "s", "tok/s", "x", "1", "decode", "tok/s", "x", "1",
        "passes", "passes/tok", "same", "tokens", "as", "1",
    ]  # fmt: skip
    printed = [line.split() for line in table[3:] if line.split()[:1] in (["cold"], ["warm"])]
    assert [(r[0], int(r[1])) for r in printed] == [
        (regime, c) for regime in ("cold", "warm") for c in (1, 2, 4)
    ]  # 1 is always measured: the ratios divide by it
    rows = json.loads(out_json.read_text())["concurrency"]
    assert len(rows) == 6 and all(r["ok"] for r in rows)
    for regime in ("cold", "warm"):
        mine = [r for r in rows if r["regime"] == regime]
        for r in mine:
            assert r["lengths"] == [6]  # eos ignored: every request made all its tokens
            assert r["tokens"] == 6 * r["streams"] and r["tokens_per_s"] > 0
            assert r["decode_tokens_per_s"] > 0 and 0 < r["first_pass_s"] < r["wall_s"]
        per_token = [r["passes_per_token"] for r in mine]
        assert per_token == sorted(per_token, reverse=True) and per_token[0] > per_token[-1]
        assert mine[0]["passes_per_token"] >= 1.0  # one stream: a pass per token at least
        assert mine[-1]["passes"] < 4 * mine[0]["passes"]  # four streams shared their passes
        assert mine[0]["ratio"] == mine[0]["decode_ratio"] == 1.0


def test_levels_and_ratios():
    assert parse_levels("16,4, 8,4") == [1, 4, 8, 16]
    with pytest.raises(SystemExit, match="levels must be integers >= 1"):
        parse_levels("0,2")
    with pytest.raises(SystemExit, match="expected integers"):
        parse_levels("two")

    def row(regime, streams, overall, decode):
        rate = {"tokens_per_s": overall, "decode_tokens_per_s": decode}
        return {"regime": regime, "ok": True, "streams": streams, **rate}

    rows = [
        row("cold", 1, 1.0, 2.0),
        row("cold", 8, 4.0, 13.0),
        row("cold", 16, 6.0, 30.0),
        row("warm", 8, 5.0, 5.0),  # no single stream: no ratio
    ]
    set_ratios(rows)
    assert [r.get("ratio") for r in rows] == [1.0, 4.0, 6.0, None]
    assert [r.get("decode_ratio") for r in rows] == [1.0, 6.5, 15.0, None]
    met = {g["goal"]: g["met"] for g in goals(rows)}
    assert met == {  # judged on decode tokens/s
        "cold: 8 streams >= 6x the decode tokens/s of one": True,
        "cold: 16 streams >= 10x the decode tokens/s of one": True,
    }
    rows[2]["decode_ratio"] = 9.0
    assert [g["met"] for g in goals(rows)] == [True, False]
