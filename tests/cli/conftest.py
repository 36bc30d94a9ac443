"""Shared by the CLI tests: one default-model build per session, and a runner for `rabbit`
subprocesses.

The build is itself the concurrency test: two processes ask for the default model at once in a fresh
cache directory (RABBITLLM_CACHE), the first one silent (progress=False) and the second one started
only once the first holds the lock, so it must wait and then reuse. Every other test then uses that
cache, offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BUILD_TIMEOUT = 900  # seconds; the build takes about a minute on two idle cores
RUN_TIMEOUT = 600

_BUILDER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="LOG %(name)s: %(message)s", stream=sys.stderr)
from rabbitllm.default_model import default_model_path
print(default_model_path(progress=sys.argv[1] == "1"))
"""


@dataclass
class BuildProcess:
    progress: bool
    returncode: int
    stdout: str
    stderr: str

    @property
    def log_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("LOG ")]

    @property
    def other_stderr(self) -> str:
        """stderr without our log lines: progress bars and anything else the libraries printed."""
        return "\n".join(
            line for line in self.stderr.splitlines() if not line.startswith("LOG ")
        ).strip()


@dataclass
class DefaultModelCache:
    cache_dir: Path
    model_dir: Path
    builds: list[BuildProcess]
    env: dict[str, str]


def base_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RABBITLLM_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TQDM_DISABLE", None)
    return env


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            return  # finished (or failed) before we saw it; the assertions will tell
        time.sleep(0.2)


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory) -> DefaultModelCache:
    cache_dir = tmp_path_factory.mktemp("rabbit-cache")
    logs = tmp_path_factory.mktemp("build-logs")
    env = base_env(cache_dir)
    procs = []
    for i, progress in enumerate((False, True)):
        out, err = logs / f"{i}.out", logs / f"{i}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(
                (
                    progress,
                    out,
                    err,
                    subprocess.Popen(
                        [sys.executable, "-c", _BUILDER, "1" if progress else "0"],
                        stdout=fo,
                        stderr=fe,
                        env=env,
                    ),
                )
            )
        if i == 0:  # start the second one only once the first is building, inside the lock
            _wait_for(err, "Building the default model once", procs[0][3], BUILD_TIMEOUT)
    builds = []
    for progress, out, err, proc in procs:
        proc.wait(timeout=BUILD_TIMEOUT)
        builds.append(BuildProcess(progress, proc.returncode, out.read_text(), err.read_text()))
    for b in builds:
        assert b.returncode == 0, b.stderr[-3000:]
    model_dir = Path(builds[0].stdout.strip())
    return DefaultModelCache(cache_dir, model_dir, builds, env)


def rabbit_command() -> list[str]:
    """The installed `rabbit` script beside this Python, else `python -m rabbitllm.cli`."""
    script = shutil.which("rabbit", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "rabbitllm.cli"]


def run_rabbit(
    args: list[str], env: dict[str, str], *, stdin: str | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*rabbit_command(), *args],
        input=stdin if stdin is not None else "",
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def start_rabbit(args: list[str], env: dict[str, str], *, stdin: str = "") -> subprocess.Popen:
    """Start without waiting (several independent runs overlap their imports on two cores)."""
    proc = subprocess.Popen(
        [*rabbit_command(), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    proc._rabbit_stdin = stdin  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    out, err = proc.communicate(proc._rabbit_stdin, timeout=timeout)  # type: ignore[attr-defined]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
