"""`rabbit bench`: run the repository's side-by-side benchmark (tools/rabbit_bench) on a model.

The bench is a development tool that lives in the source checkout's tools/, not in the installed
package: it starts a child process per engine and caps their memory with cgroups, which a library
has no business doing. So this command finds the checkout (the one this package is installed from
in editable mode, or the working directory or a parent of it), runs `python -m tools.rabbit_bench`
there with this Python, and says clearly when there is no checkout. Arguments after `--` go to the
bench unchanged (`rabbit bench -- --regimes warm --tokens 4`). Without --model it measures the
default model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rabbit_store.compression import COMPRESSION_CHOICES
from rabbit_store.constants import CHECKOUT_ENV as BENCH_ENV
from rabbitllm.cli.console import Console
from rabbitllm.cli.errors import FeatureNotAvailableError, UsageError

#: The bench's rows for `--compression`: bf16 streaming and transformers as references, our
#: compressed row, and llama.cpp at the same bits (tools/rabbit_bench/spec.py names them).
COMPRESSION_ENGINES = {
    8: ("rabbit", "rabbit-8bit", "transformers", "llamacpp-q8_0"),
    4: ("rabbit", "rabbit-4bit", "transformers", "llamacpp-q4_0"),
}

#: The package, relative to a checkout's root.
BENCH_PACKAGE = Path("tools") / "rabbit_bench"
BENCH_MODULE = "tools.rabbit_bench"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "bench",
        parents=[common],
        help="run the repository's benchmark, tools/rabbit_bench (source checkout only)",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--model",
        "-m",
        metavar="DIR",
        help="local checkpoint directory to measure (default: the default model)",
    )
    p.add_argument(
        "--compression",
        choices=sorted(COMPRESSION_CHOICES),
        default=None,
        help="measure RabbitLLM compressed (the bench's rabbit-8bit or rabbit-4bit row) beside "
        "bf16 streaming, transformers and llama.cpp at the same bits",
    )
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="more arguments for python -m tools.rabbit_bench (after --)",
    )
    p.set_defaults(func=run)


def is_checkout(folder: Path) -> bool:
    return (folder / BENCH_PACKAGE / "__main__.py").is_file() and (
        folder / "tools" / "__init__.py"
    ).is_file()


def find_checkout() -> Path:
    """$RABBITLLM_CHECKOUT, else the checkout above this package (editable installs), else the
    working directory or one of its parents. Raises FeatureNotAvailableError naming what is
    missing."""
    explicit = os.environ.get(BENCH_ENV)
    if explicit:
        folder = Path(explicit).expanduser().resolve()
        if is_checkout(folder):
            return folder
        raise FeatureNotAvailableError(
            f"rabbit bench: {BENCH_ENV}={explicit} is not a RabbitLLM source checkout (no "
            f"{BENCH_PACKAGE}/__main__.py there); point it at the repository's root."
        )
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if is_checkout(folder):
                return folder
    raise FeatureNotAvailableError(
        f"rabbit bench is not available here: the benchmark is a development tool that lives in "
        f"the repository's {BENCH_PACKAGE}/ and is not installed with the package. Run this from "
        f"a clone of the RabbitLLM repository (or set {BENCH_ENV} to one), or run "
        f"`python -m {BENCH_MODULE}` from the clone's root."
    )


def run(args: argparse.Namespace, console: Console) -> int:
    checkout = find_checkout()
    extra = list(args.bench_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if args.model:
        model = args.model
    else:
        from rabbitllm.default_model import default_model_path

        model = str(default_model_path(progress=not console.quiet))
    if args.compression:
        if any(a == "--engines" or a.startswith("--engines=") for a in extra):
            raise UsageError("--compression picks the engines; drop --engines after --.")
        bits = COMPRESSION_CHOICES[args.compression]
        extra += ["--engines", ",".join(COMPRESSION_ENGINES[bits])]
    command = [sys.executable, "-m", BENCH_MODULE, "--model", model, *extra]
    console.note(f"running python -m {BENCH_MODULE} in {checkout}")
    return subprocess.call(command, cwd=checkout)
