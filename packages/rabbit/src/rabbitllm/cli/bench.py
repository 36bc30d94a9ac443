"""`rabbit bench`: run tools/bench.py (the perf team's measurement) on a model.

tools/bench.py belongs to the source checkout, not to the installed package: it starts child
processes and caps their memory, which a library has no business doing. So the command looks for it
beside the package (editable installs) or in the current directory, runs it in a child process with
this Python, and says clearly when it is not there. Arguments after `--` go to bench.py unchanged
(`rabbit bench -- --regimes warm --tokens 4`). Without --model it measures the default model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rabbitllm.cli.console import Console
from rabbitllm.cli.errors import FeatureNotAvailableError

BENCH_ENV = "RABBITLLM_BENCH"  # explicit path to bench.py, for installs outside the checkout


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "bench",
        parents=[common],
        help="run tools/bench.py's measurement (source checkout only)",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--model",
        "-m",
        metavar="DIR",
        help="local checkpoint directory to measure (default: the default model)",
    )
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="more arguments for tools/bench.py (after --)",
    )
    p.set_defaults(func=run)


def find_bench_script() -> Path | None:
    """$RABBITLLM_BENCH, else tools/bench.py in a parent of this package or of the working directory."""
    explicit = os.environ.get(BENCH_ENV)
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in (start, *start.parents):
            candidate = folder / "tools" / "bench.py"
            if candidate.is_file():
                return candidate
    return None


def run(args: argparse.Namespace, console: Console) -> int:
    script = find_bench_script()
    if script is None:
        raise FeatureNotAvailableError(
            "rabbit bench is not available: tools/bench.py was not found (it ships with the source "
            f"checkout; run from there, or set {BENCH_ENV}=/path/to/bench.py)."
        )
    extra = list(args.bench_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if args.model:
        model = args.model
    else:
        from rabbitllm.default_model import default_model_path

        model = str(default_model_path(progress=not console.quiet))
    command = [sys.executable, str(script), "--model", model, *extra]
    console.note(f"running {script}")
    return subprocess.call(command, cwd=script.parent.parent)
