"""A tiny model with a real tokenizer, and real `rabbit serve` processes on free ports.

The model: tests/chat_model.py (a 2-layer random Llama with SmolLM2's real tokenizer and chat
template), so the server's text can be compared with transformers' own `generate` token for token.

Servers are started with `--port 0`; the port is read from the ready line the CLI writes on stderr.
Each server's finalizer kills its process (and waits), whatever the test did.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chat_model import build_tiny_chat_model

START_TIMEOUT = 180.0  # seconds: imports and the model load, on a busy 2-core machine
READY = re.compile(r"Serving (\S+) at (http://\S+)/v1")
MODEL_NAME = "tiny-llama"
CONTEXT = 2048  # the tiny model's max_position_embeddings (a long request runs for seconds)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-serve-model"), context=CONTEXT)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    """transformers' own model for the tiny checkpoint (the oracle for greedy text)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def oracle_ids(reference, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=reference.config.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # tiny matmuls; spinning OpenMP threads only slow a shared machine
    )
    env.pop("RABBIT_API_KEY", None)
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    stderr_path: Path
    url: str = ""  # http://127.0.0.1:PORT
    name: str = ""
    _stderr: object = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        """The process's resident memory (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def client(self, **kwargs):
        from openai import OpenAI

        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("timeout", 60.0)
        kwargs.setdefault("max_retries", 0)
        return OpenAI(base_url=self.base_url, **kwargs)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self._stderr is not None:
            self._stderr.close()  # type: ignore[attr-defined]
            self._stderr = None
        return self.proc.returncode


def start_server(
    model_dir: Path,
    args: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    name: str | None = MODEL_NAME,
) -> Server:
    """Start `rabbit serve` on a free port and wait until it answers; `name=None` leaves the
    served name to its default (the --model value)."""
    stderr_path = log_dir / f"serve-{time.monotonic_ns()}.err"
    err = open(stderr_path, "w")
    command = [
        sys.executable,
        "-m",
        "rabbitllm.cli",
        "serve",
        "--model",
        str(model_dir),
        *(["--served-model-name", name] if name else []),
        "--port",
        "0",
        "--device",
        "cpu",
        *args,
    ]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=env or server_env(),
    )
    server = Server(proc, stderr_path, _stderr=err)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = READY.search(server.stderr())
        if match:
            server.name, server.url = match.group(1), match.group(2)
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"rabbit serve did not start (exit {proc.returncode}):\n{server.stderr()}")


@pytest.fixture
def make_server(tiny_model_dir, tmp_path) -> Iterator[Callable[..., Server]]:
    """Start servers with extra arguments; every one is stopped after the test."""
    started: list[Server] = []

    def make(
        *args: str, env: dict[str, str] | None = None, name: str | None = MODEL_NAME
    ) -> Server:
        server = start_server(tiny_model_dir, list(args), tmp_path, env, name)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    """One plain server shared by a module's tests (each test checks it still serves)."""
    s = start_server(tiny_model_dir, [], tmp_path_factory.mktemp("serve-logs"))
    yield s
    s.stop()
