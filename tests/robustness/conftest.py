"""Helpers and fixtures of the robustness tests: CLI runners, directory snapshots, a tiny Llama."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_TIMEOUT = 120


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: offline hub, no inherited tokens or AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1")
    env.update(extra)
    return env


def start_store_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rabbit_store.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or cli_env(),
    )


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def store_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return finish(start_store_cli(*args, env=env))


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2, one `error: ...` line on stderr naming `fragments`, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file (and symlink) under `roots`: relative path -> (size, sha256); dirs by name."""
    state: dict[str, tuple[int, str]] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            key = f"{root}/{path.relative_to(root)}"
            if path.is_symlink():
                state[key] = (-1, os.readlink(path))
            elif path.is_file():
                data = path.read_bytes()
                state[key] = (len(data), hashlib.sha256(data).hexdigest())
            else:
                state[key] = (-2, "dir")
    return state


def digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a split directory except the lock file."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != ".rabbit-split.lock"
    }


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved by transformers as one model.safetensors (float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama") / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    assert (path / "model.safetensors").exists()
    return path
