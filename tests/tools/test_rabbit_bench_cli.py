"""`rabbit bench`: runs the checkout's tools/rabbit_bench, and says what is missing without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitllm.cli import bench as bench_command
from rabbitllm.cli import main
from rabbitllm.cli.errors import FeatureNotAvailableError

ROOT = Path(__file__).resolve().parents[2]


def test_finds_this_checkout(monkeypatch):
    monkeypatch.delenv(bench_command.BENCH_ENV, raising=False)
    assert bench_command.find_checkout() == ROOT
    monkeypatch.setenv(bench_command.BENCH_ENV, str(ROOT))
    assert bench_command.find_checkout() == ROOT


def test_runs_the_bench_module_from_the_checkout(tmp_path, capfd):
    """Everything after `--` reaches the bench: its own --help proves it was found and ran."""
    code = main(["bench", "--model", str(tmp_path), "--", "--help"])
    out = capfd.readouterr().out
    assert code == 0
    assert "usage: python -m tools.rabbit_bench" in out and "--regimes" in out


@pytest.fixture
def outside_a_checkout(tmp_path, monkeypatch):
    """An installed (non-editable) package run from a directory that is no checkout."""
    site = tmp_path / "site-packages" / "rabbitllm" / "cli"
    site.mkdir(parents=True)
    monkeypatch.setattr(bench_command, "__file__", str(site / "bench.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(bench_command.BENCH_ENV, raising=False)
    return tmp_path


def test_outside_a_checkout_names_what_is_missing(outside_a_checkout, capsys):
    with pytest.raises(FeatureNotAvailableError) as err:
        bench_command.find_checkout()
    message = str(err.value)
    assert "tools/rabbit_bench" in message and "not installed with the package" in message
    assert bench_command.BENCH_ENV in message

    code = main(["bench", "--model", str(outside_a_checkout)])
    captured = capsys.readouterr()
    assert code == 2
    assert "tools/rabbit_bench" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_a_wrong_checkout_variable_is_named(outside_a_checkout, monkeypatch):
    monkeypatch.setenv(bench_command.BENCH_ENV, str(outside_a_checkout))
    with pytest.raises(FeatureNotAvailableError, match="RABBITLLM_CHECKOUT=.* is not a RabbitLLM"):
        bench_command.find_checkout()


def test_compression_picks_rows_the_bench_has():
    """`rabbit bench --compression 8bit|4bit` names the bench's own rows (a renamed row fails
    here, not in a user's run)."""
    from tools.rabbit_bench.spec import ENGINES

    for bits, engines in bench_command.COMPRESSION_ENGINES.items():
        assert set(engines) <= set(ENGINES), engines
        assert f"rabbit-{bits}bit" in engines


def test_compression_and_engines_together_are_refused(tmp_path, capsys):
    code = main(
        ["bench", "--model", str(tmp_path), "--compression", "4bit", "--", "--engines", "x"]
    )
    assert code == 2
    assert "--compression picks the engines" in capsys.readouterr().err
