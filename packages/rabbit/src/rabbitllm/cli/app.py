"""Argument parsing, dispatch, and the one place where errors become exit statuses.

Exit statuses: 0 success; 2 a user error (bad argument, bad path, unsupported model: any
RabbitError, and argparse's own errors), printed as one line `rabbit: error: ...` on stderr; 1 an
unexpected error (also one line; --debug shows the traceback); 130 interrupted. Token values never
reach the terminal: the Console redacts them from every line, logs included.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rabbitllm.cli import batch, bench, chat, doctor, generate, serve, store
from rabbitllm.cli.console import Console, configure_logging, disable_progress_bars, secret_values
from rabbitllm.cli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UsageError

COMMANDS = ("generate", "chat", "batch", "serve", "split", "inspect", "verify", "bench", "doctor")

#: Options every subcommand takes, and `rabbit` itself before the command. The top-level copies get
#: their own dests (`top_quiet`, ...) and are merged after parsing: a subcommand's default must not
#: overwrite a value given before the command (`rabbit --quiet split ...`), whoever defined the
#: flag.
COMMON_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--quiet", "-q"),
        {
            "action": "store_true",
            "dest": "quiet",
            "help": "no progress bars or notes; results only",
        },
    ),
    (("--verbose", "-v"), {"action": "store_true", "dest": "verbose", "help": "info logs"}),
    (
        ("--debug",),
        {"action": "store_true", "dest": "debug", "help": "debug logs, and tracebacks on errors"},
    ),
]


class Parser(argparse.ArgumentParser):
    """argparse, but an error raises UsageError (one line, exit 2) instead of printing usage and
    exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    parser = Parser(
        prog="rabbit",
        description="Run Hugging Face causal LMs larger than memory by streaming decoder layers "
        "from storage.",
    )
    from rabbitllm import __version__

    parser.add_argument("--version", action="version", version=f"rabbitllm {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    for flags, kwargs in COMMON_OPTIONS:
        parser.add_argument(*flags, **{**kwargs, "dest": "top_" + kwargs["dest"]})
        common.add_argument(*flags, **kwargs)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    generate.add_parser(subparsers, common)
    chat.add_parser(subparsers, common)
    batch.add_parser(subparsers, common)
    serve.add_parser(subparsers, common)
    store.add_parsers(subparsers, COMMON_OPTIONS)
    bench.add_parser(subparsers, common)
    doctor.add_parser(subparsers, common)
    return parser


def merge_common_options(args: argparse.Namespace) -> None:
    """--quiet/--verbose/--debug given before or after the command: either counts."""
    for _, kwargs in COMMON_OPTIONS:
        dest = kwargs["dest"]
        setattr(args, dest, bool(getattr(args, dest, False) or getattr(args, "top_" + dest, False)))


def _argv_secrets(argv: Sequence[str]) -> list[str]:
    """--token and --api-key values (and secret storage options) in the raw arguments, before
    parsing."""
    tokens: list[str] = []
    pairs: list[str] = []
    for i, arg in enumerate(argv):
        for flag, bucket in (
            ("--token", tokens),
            ("--api-key", tokens),
            ("--storage-option", pairs),
        ):
            if arg == flag and i + 1 < len(argv):
                bucket.append(argv[i + 1])
            elif arg.startswith(flag + "="):
                bucket.append(arg[len(flag) + 1 :])
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = value
    return [*tokens, *secret_values(None, options)]


def main(argv: Sequence[str] | None = None) -> int:
    """The `rabbit` entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(debug="--debug" in argv)
    console.add_secrets(_argv_secrets(argv))
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError(
                f"a command is required: one of {', '.join(COMMANDS)} (see `rabbit --help`)"
            )
    except UsageError as exc:
        console.error(str(exc), exc)
        return EXIT_USAGE
    merge_common_options(args)
    console.quiet, console.debug = args.quiet, args.debug
    configure_logging(console, verbose=bool(args.verbose))
    if console.quiet:
        disable_progress_bars()
    return run(args, console)


def run(args: argparse.Namespace, console: Console) -> int:
    from rabbit_store.errors import RabbitError

    try:
        return int(args.func(args, console))
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
    except RabbitError as exc:
        console.error(str(exc), exc)
        return EXIT_USAGE
    except BrokenPipeError:  # `rabbit generate ... | head`: the reader left; nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit-time flush does not fail again
        return EXIT_FAILURE
    except Exception as exc:
        console.error(
            f"{type(exc).__name__}: {exc}"
            + ("" if console.debug else " (rerun with --debug for the traceback)"),
            exc,
        )
        return EXIT_FAILURE
