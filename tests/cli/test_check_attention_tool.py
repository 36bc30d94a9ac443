"""tools/check_attention_and_benchmark.py on the default model, in process (no torch import per
run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_attention_and_benchmark.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("check_attention_and_benchmark", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_availability_and_active_implementation(tool, default_model_cache, capsys):
    from rabbitllm.utils.platform import is_flash_attention_available

    assert tool.main(["--model", str(default_model_cache.model_dir)]) == 0
    out = capsys.readouterr().out
    available, reason = is_flash_attention_available()
    if available:
        assert "flash_attention_2 available: True\n" in out
    else:  # unavailable always comes with its reason, on the same line
        assert reason.strip(), "flash-attn unavailable without a reason"
        assert f"flash_attention_2 available: False ({reason})\n" in out
    assert "active implementation with attn_implementation='auto': " in out


def test_benchmark_compares_auto_sdpa_eager(tool, default_model_cache, capsys):
    argv = ["--model", str(default_model_cache.model_dir), "--benchmark", "--tokens", "1"]
    assert tool.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith("x")]
    assert [row[0] for row in rows] == ["auto", "sdpa", "eager"]
    assert rows[2][1] == "eager"
    assert all(float(row[2]) > 0 for row in rows)
