"""Options shared by the model commands, and their validation before anything heavy happens.

Why validate here: a bad `--dtype` should fail in a second with one line, not after the tokenizer
and the model are loaded. The checks reuse the engine's own parsers (`rabbit_engine.options`), so
the CLI and the Python API reject the same values with the same words.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rabbitllm.cli.errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from; `location` is what gets printed, and never holds the token."""

    location: str
    revision: str | None = None
    token: str | None = field(default=None, repr=False)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    is_default: bool = False


def add_source_options(parser: argparse.ArgumentParser, *, model_flag: bool = True) -> None:
    """--model, --revision, --token, --storage-option (repeatable), --trust-remote-code."""
    if model_flag:
        parser.add_argument(
            "--model",
            "-m",
            metavar="SRC",
            help="local directory, hub id (org/name), or fsspec URL (s3://bucket/prefix); "
            "default: the bundled SmolLM2-135M-Instruct, built on first use",
        )
    parser.add_argument("--revision", help="hub branch, tag or commit")
    parser.add_argument(
        "--token", help="hub token (default: HF_TOKEN or the saved login); never printed"
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="fsspec storage option, repeatable (e.g. endpoint_url=http://localhost:9000); "
        "values that parse as JSON (true, 3, {...}) are taken as such",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model's own Python code (only for authors you trust)",
    )


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `StreamingOptions` (rabbit_engine.options), plus --layers."""
    from rabbit_engine.options import ATTN_CHOICES, DEFAULT_PREFETCH
    from rabbit_store.compression import COMPRESSION_CHOICES, DEFAULT_GROUP_SIZE, GROUP_SIZES

    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or auto (default: auto = the checkpoint's own dtype)",
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory for resident layers: bytes, 6GiB, 500MB or auto (default: stream every layer)",
    )
    parser.add_argument(
        "--attn-implementation",
        default="auto",
        choices=ATTN_CHOICES,
        help="attention kernel (default: auto = flash_attention_2 if it works, else sdpa)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=DEFAULT_PREFETCH,
        metavar="N",
        help=f"layers read ahead of the one computing (default: {DEFAULT_PREFETCH})",
    )
    parser.add_argument(
        "--bit-exact",
        action="store_true",
        help="copy unaligned weights so float32 logits equal transformers' bit for bit "
        "(one copy per streamed layer)",
    )
    parser.add_argument(
        "--compression",
        default=None,
        choices=sorted(COMPRESSION_CHOICES),
        help="stream the decoder layers' linear weights compressed: 8bit (int8 per channel) or "
        "4bit (int4 in groups); the first run compresses the model once into the cache",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="N",
        help=f"input features per 4-bit scale and zero point: one of "
        f"{', '.join(map(str, GROUP_SIZES))} (default: {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument(
        "--layers",
        metavar="DIR",
        help="read the weights from this split directory (made by `rabbit split`, compressed "
        "or not)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time reads, waits and compute per step; print the summary to stderr",
    )


def model_spec(args: argparse.Namespace, *, progress: bool) -> ModelSpec:
    """The model to use: --model, else the default model (built into the cache on first use)."""
    storage_options = parse_storage_options(getattr(args, "storage_option", None))
    if getattr(args, "model", None):
        return ModelSpec(
            args.model, revision=args.revision, token=args.token, storage_options=storage_options
        )
    from rabbitllm.default_model import default_model_path

    if args.revision:
        raise UsageError("--revision applies to hub models; it needs --model.")
    return ModelSpec(str(default_model_path(progress=progress)), is_default=True)


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """`key=value` pairs into a dict, with the same rules as `rabbit-store` (dotted keys nest)."""
    from rabbit_store.cli import parse_storage_options as store_parse

    return store_parse(pairs)


@dataclass(frozen=True)
class RuntimeOptions:
    """The model commands' options: the engine's validated `StreamingOptions`, and where from."""

    streaming: Any  # rabbit_engine.options.StreamingOptions (imported lazily: it imports torch)
    layers: str | None
    trust_remote_code: bool

    @property
    def profile(self) -> bool:
        return self.streaming.profile


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """Build `StreamingOptions` from the flags; a bad value raises UsageError naming the flag.

    Validated here, before the tokenizer and the model load, so a bad `--dtype` fails in a second
    with one line; the engine's own parser does it, so the words are the Python API's.
    """
    from rabbit_engine.errors import InvalidOptionError
    from rabbit_engine.options import StreamingOptions

    given = {name: getattr(args, name) for name in StreamingOptions.names() if hasattr(args, name)}
    try:
        streaming = StreamingOptions.create(**given)
    except InvalidOptionError as exc:
        flag = "--" + (exc.option or "option").replace("_", "-")
        raise UsageError(f"{flag} {given.get(exc.option or '', '')}: {exc}") from exc
    return RuntimeOptions(
        streaming=streaming, layers=args.layers, trust_remote_code=args.trust_remote_code
    )


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool], rule: str) -> Any:
    """Parse `text` as `kind` and check it; argparse shows the ArgumentTypeError as a usage
    error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not ok(value):  # a comparison that is False for nan rejects nan too
        raise argparse.ArgumentTypeError(f"{text} must be {rule}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "an integer", lambda v: v >= 1, "at least 1")


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0 (temperature; 0 means greedy)."""
    return _number(text, float, "a number", lambda v: v >= 0, ">= 0 (0 = greedy)")


def probability(text: str) -> float:
    """argparse type: a float in (0, 1] (top-p)."""
    return _number(text, float, "a number", lambda v: 0 < v <= 1, "in (0, 1]")
