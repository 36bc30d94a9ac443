"""`rabbit serve`'s command line without a server: the missing extra, bad flags."""

from __future__ import annotations

import importlib.util
import socket

import pytest

from rabbitllm.cli.app import main


def test_missing_serve_extra_is_one_clear_line(monkeypatch, capsys, isolated_logging):
    real = importlib.util.find_spec

    def without_fastapi(name, *args, **kwargs):
        return None if name == "fastapi" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_fastapi)
    assert main(["serve", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert 'pip install "rabbitllm[serve]"' in err[0] and "fastapi" in err[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port 70000"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--prompt-lookup", "x"], "--prompt-lookup"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, isolated_logging, args, words):
    assert main(["serve", "--model", "/nonexistent", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_taken_port_fails_before_the_model_loads(capsys, isolated_logging):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the model path does not exist: reaching it would be a different error
        assert main(["serve", "--model", "/nonexistent", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"rabbit: error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(--port 0 picks a free port)"
    ]
