"""`rabbit inspect | split | verify`: rabbit-store's own commands, mounted as they are.

Why mount rather than rewrite: `rabbit_store.cli.add_subcommands` exists for this, so `rabbit split`
and `rabbit-store split` take the same options and print the same thing; the library functions
underneath are `rabbit_store.inspect.describe`, `split_checkpoint` and `verify_split`. Our common
options (--quiet, --debug, -v) are added to each where the store did not define them already.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rabbitllm.cli.errors import UsageError

STORE_COMMANDS = ("inspect", "split", "verify")


def add_parsers(
    subparsers: Any, common_options: list[tuple[tuple[str, ...], dict[str, Any]]]
) -> None:
    from rabbit_store.cli import add_subcommands

    add_subcommands(subparsers)
    for name in STORE_COMMANDS:
        parser: argparse.ArgumentParser | None = subparsers.choices.get(name)
        if parser is None:
            continue
        for flags, kwargs in common_options:
            try:
                parser.add_argument(*flags, **kwargs)
            except argparse.ArgumentError:
                pass  # the store defines this flag itself (split's --quiet): keep its meaning
        parser.set_defaults(func=_store_runner(parser.get_default("func")))
    split = subparsers.choices.get("split")
    if split is not None:
        _add_compression(split)
    inspect = subparsers.choices.get("inspect")
    if inspect is not None:
        _add_family(inspect)


def _add_family(parser: argparse.ArgumentParser) -> None:
    """`rabbit inspect` also names the checkpoint's family and the adapter RabbitLLM streams it
    with; the store's own inspect knows neither (it reads headers and never imports torch)."""
    plain = parser.get_default("func")

    def run(args: argparse.Namespace, console: Any) -> int:
        code = plain(args, console)
        if code == 0 and not args.json:
            line = family_line(_config_of(args))
            if line:
                sys.stdout.flush()  # the store printed with print(); keep the order
                console.result(line)
        return code

    parser.set_defaults(func=run)


def _config_of(args: argparse.Namespace) -> dict[str, Any] | None:
    """The checkpoint's config.json, or None when it has none (a bare safetensors folder)."""
    from rabbit_store import open_source
    from rabbit_store.cli import parse_storage_options

    source = open_source(
        args.source,
        revision=args.revision,
        token=args.token,
        storage_options=parse_storage_options(args.storage_option),
    )
    if "config.json" not in source.list_files():
        return None
    try:
        data = json.loads(source.read_bytes("config.json"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def family_line(config: dict[str, Any] | None) -> str | None:
    """The `family: ...` line for a model_type rabbit_models knows (its support table, or a
    remote-code family it translates), else None."""
    from transformers import PretrainedConfig

    from rabbit_models.registry import adapter_for
    from rabbit_models.remote import ADAPTERS, family_for
    from rabbit_models.support import support_for

    model_type = config.get("model_type") if config else None
    if not isinstance(model_type, str):
        return None
    family = family_for(config)
    if family is not None:
        return (
            f"family: {model_type} (the checkpoint's own code is not run; adapter "
            f"{ADAPTERS[family.name].describe()})"
        )
    row = support_for(model_type)
    if row is None:
        return None
    if not row.supported:
        return f"family: {model_type} (not supported: {row.reason})"
    probe = PretrainedConfig()
    probe.model_type = model_type  # all adapter_for reads of a transformers family
    adapter = type(adapter_for(probe))
    name = f"{adapter.__module__}.{adapter.__qualname__}"
    return f"family: {model_type} (transformers' own model; adapter {name})"


def _add_compression(parser: argparse.ArgumentParser) -> None:
    """`rabbit split --compression 8bit|4bit`: the store's split, with the engine packing each
    decoder layer's linear weights as it writes them (rabbit-store alone has no torch)."""
    from rabbit_store.compression import COMPRESSION_CHOICES, DEFAULT_GROUP_SIZE, GROUP_SIZES

    parser.add_argument(
        "--compression",
        choices=sorted(COMPRESSION_CHOICES),
        default=None,
        help="write the decoder layers' linear weights compressed (8bit: int8 per channel; 4bit: "
        "int4 in groups), in the layout torch's CPU kernels take",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="N",
        help=f"4bit: input features per scale and zero point, one of "
        f"{', '.join(map(str, GROUP_SIZES))} (default: {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="dtype of the scales, the run dtype to be used (default: the checkpoint's)",
    )
    plain = parser.get_default("func")

    def run(args: argparse.Namespace, console: Any) -> int:
        if args.compression is None:
            if args.group_size is not None or args.dtype is not None:
                raise UsageError("--group-size and --dtype apply to --compression only.")
            return plain(args, console)
        return _compressed_split(args, console)

    parser.set_defaults(func=run)


def _compressed_split(args: argparse.Namespace, console: Any) -> int:
    from rabbit_engine.errors import InvalidOptionError
    from rabbit_engine.options import parse_compression_option, parse_dtype
    from rabbit_engine.quant import compress_checkpoint
    from rabbit_store.cli import parse_storage_options

    if args.token:
        console.add_secrets([args.token])
    if args.delete_original:
        raise UsageError("--delete-original does not apply to --compression (the original stays).")
    try:
        scheme = parse_compression_option(args.compression, args.group_size)
        dtype = parse_dtype(args.dtype)
    except InvalidOptionError as exc:
        flag = "--" + (exc.option or "compression").replace("_", "-")
        raise UsageError(f"{flag}: {exc}") from exc
    storage_options = parse_storage_options(args.storage_option)
    manifest = compress_checkpoint(
        args.source,
        args.dest,
        args.compression,  # a string: its scales get the run dtype (a parsed scheme keeps bf16)
        group_size=scheme.group_size,
        dtype=dtype,
        progress=not args.quiet,
        token=args.token,
        revision=args.revision,
        storage_options=storage_options,
        dest_storage_options=parse_storage_options(args.dest_storage_option),
        layer_prefix=args.layer_prefix,
    )
    if not args.quiet:
        record = manifest.compression_record()
        console.note(
            f"split {manifest.source} into {args.dest} compressed {record.scheme.name}: "
            f"{len(record.tensors)} weights packed, {manifest.num_layers} layers, "
            f"{len(manifest.files)} files, {manifest.total_size / 2**20:.1f} MiB"
        )
    return 0


def _store_runner(func: Any) -> Any:
    """Adapt a store command `func(args) -> int` to our `run(args, console) -> int`."""

    def run(args: argparse.Namespace, console: Any) -> int:
        if hasattr(args, "token") and args.token:
            console.add_secrets([args.token])
        return int(func(args))

    return run
