"""`rabbit-store inspect | split | verify`: a thin layer over describe, split_checkpoint and
verify_split.

`add_subcommands(subparsers)` lets the `rabbit` CLI mount the same commands. A RabbitError prints
one line on stderr and exits 2 (`--debug` shows the traceback); a failed verify exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .errors import InvalidOptionError, RabbitError

EXIT_USER_ERROR = 2
EXIT_VERIFY_FAILED = 1


def parse_storage_options(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """`key=value` pairs into a dict; dotted keys nest (client_kwargs.region_name=eu-west-1) and
    values that parse as JSON (true, 3, {"a": 1}) are taken as such."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidOptionError(
                f"--storage-option {pair!r}: expected key=value (e.g. endpoint_url=http://host:9000)."
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return options


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "revision": args.revision,
        "token": args.token,
        "storage_options": parse_storage_options(args.storage_option),
        "layer_prefix": args.layer_prefix,
    }


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import describe

    info = describe(args.source, **_source_options(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['location']}")
    total = _human(info["total_bytes"])
    print(f"  files: {len(info['files'])}, tensors: {info['num_tensors']}, {total}")
    print(f"  dtypes: {', '.join(f'{d} x{n}' for d, n in info['dtypes'].items())}")
    tied = "yes" if info["tied"] else "no"
    print(f"  layers: {info['num_layers']} under {info['layer_prefix']!r}; tied head: {tied}")
    for part, value in info["parts"].items():
        if value["tensors"]:
            print(f"  {part}: {len(value['tensors'])} tensor(s), {_human(value['bytes'])}")
    for layer in info["layers"]:
        files = ", ".join(layer["files"])
        print(
            f"  layer {layer['index']}: {layer['tensors']} tensors, {_human(layer['bytes'])} "
            f"({files})"
        )
    if info.get("compression"):
        _print_compression(info["compression"])
    return 0


def _print_compression(summary: dict[str, Any]) -> None:
    """The compression block of `inspect`: scheme, what was compressed, and what it saved."""
    group = (
        "per output channel" if summary["group_size"] is None else f"group {summary['group_size']}"
    )
    print(
        f"  compression: {summary['scheme']} ({summary['bits']}-bit, {group}, scales "
        f"{summary['scale_dtype']}), layout {summary['layout']}"
    )
    modes = ", ".join(f"{n} {mode}" for mode, n in summary["modes"].items())
    print(f"  compressed tensors: {summary['compressed_tensors']} ({modes})")
    original = summary["original_bytes"]
    share = f"{100 * summary['bytes'] / original:.1f}%" if original else "n/a"
    print(
        f"  tensor bytes: {_human(summary['bytes'])} of {_human(original)} uncompressed ({share})"
    )
    for file in summary["layer_files"]:
        print(f"    {file['name']}: {_human(file['bytes'])}")


def cmd_split(args: argparse.Namespace) -> int:
    from .split import split_checkpoint

    options = _source_options(args)
    manifest = split_checkpoint(
        args.source,
        args.dest,
        dest_storage_options=parse_storage_options(args.dest_storage_option),
        delete_original=args.delete_original,
        progress=not args.quiet,
        **options,
    )
    if not args.quiet:
        print(
            f"split {manifest.source} into {args.dest}: {manifest.num_layers} layers, "
            f"{len(manifest.files)} files, {_human(manifest.total_size)}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_split

    result = verify_split(
        args.dest,
        storage_options=parse_storage_options(args.storage_option),
        check_hashes=not args.no_hash,
    )
    for name, problem in result.problems.items():
        print(f"CORRUPTED {name}: {problem}", file=sys.stderr)
    if result.problems:
        print(
            f"{result.location}: {len(result.problems)} of {len(result.manifest.files)} file(s) "
            "failed verification; split it again.",
            file=sys.stderr,
        )
        return EXIT_VERIFY_FAILED
    print(f"{result.location}: {len(result.manifest.files)} files OK")
    return 0


def _add_common(parser: argparse.ArgumentParser, *, source: bool = True) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable), e.g. endpoint_url=http://localhost:9000",
    )
    if source:
        parser.add_argument("--token", help="hub token (default: HF_TOKEN / the saved login)")
        parser.add_argument("--revision", help="hub branch, tag or commit")
        parser.add_argument(
            "--layer-prefix", help="decoder layer prefix, e.g. model.layers (default: inferred)"
        )


def add_subcommands(subparsers: Any) -> None:
    """Add inspect/split/verify to an argparse subparsers object; each sets `func`."""
    p = subparsers.add_parser(
        "inspect", help="show layers, tensors, dtypes and sizes of a checkpoint"
    )
    p.add_argument(
        "source", help="local dir, org/name, hf://org/name, s3://bucket/prefix or fsspec URL"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("split", help="write one safetensors file per layer (resumable)")
    p.add_argument("source")
    p.add_argument("dest", help="output directory: local path or fsspec URL (s3://...)")
    p.add_argument(
        "--delete-original",
        action="store_true",
        help="delete each source shard once all its layers are written and verified",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument(
        "--dest-storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="storage option for DEST only (default: --storage-option)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_split)

    p = subparsers.add_parser(
        "verify", help="check a split against its manifest (exit 1 if corrupted)"
    )
    p.add_argument("dest")
    p.add_argument("--no-hash", action="store_true", help="check sizes and headers only")
    _add_common(p, source=False)
    p.set_defaults(func=cmd_verify)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: RabbitError -> one line on stderr and exit status 2."""
    try:
        return int(args.func(args))
    except RabbitError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabbit-store",
        description="Index, inspect, split and verify safetensors checkpoints (no torch).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="info logs")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
