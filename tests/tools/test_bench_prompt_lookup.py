"""`python -m tools.rabbit_bench.prompt_lookup`: its table on the tiny chat model, cold and warm,
through the scheduler and transformers' generate; greedy speculative rows must keep the baseline's
tokens (the tool exits 1 otherwise), and passes never exceed tokens."""

from __future__ import annotations

import pytest

from tests.chat_model import build_tiny_chat_model
from tests.tools.test_bench_smoke import run_module


@pytest.mark.slow
def test_prompt_lookup_table(tmp_path):
    model = build_tiny_chat_model(tmp_path / "model")
    proc = run_module(
        "tools.rabbit_bench.prompt_lookup",
        "--model", str(model), "--lookup", "4", "--tokens", "24", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (regime, engine, n)
        for regime in ("cold", "warm")
        for engine in ("scheduler", "generate")
        for n in ("0", "4")
    ]
    for r in rows:
        tokens, passes = int(r[3]), int(r[4])
        assert 0 < passes <= tokens and r[-1] == "yes"
        if r[2] == "0":
            assert passes == tokens
