"""`rabbit doctor`: print `rabbitllm.doctor.run_checks()` as a table; exit 1 if anything failed."""

from __future__ import annotations

import argparse
from typing import Any

from rabbitllm.cli.console import Console
from rabbitllm.cli.options import parse_storage_options

_MARK = {"ok": "ok", "info": "--", "warn": "!!", "fail": "XX"}


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "doctor",
        parents=[common],
        help="check versions, GPU, attention kernels, memory, storage speed",
        description="Versions and whether they are supported, CUDA and GPUs, Flash Attention "
        "(and why not), free RAM/VRAM, the read speed of the model's storage, the cache directory.",
    )
    p.add_argument(
        "--model",
        "-m",
        metavar="SRC",
        help="measure the read speed of this model's storage (default: a temporary file "
        "in the cache directory)",
    )
    p.add_argument("--token", help="hub token for --model; never printed")
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="fsspec storage option for --model, repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from rabbitllm.doctor import FAIL, run_checks

    findings = run_checks(
        args.model, token=args.token, storage_options=parse_storage_options(args.storage_option)
    )
    width = max(len(f.topic) for f in findings)
    for f in findings:
        console.result(f"[{_MARK.get(f.status, '  ')}] {f.topic.ljust(width)}  {f.detail}")
    return 1 if any(f.status == FAIL for f in findings) else 0
