"""`rabbit inspect | split | verify`: rabbit-store's own commands, mounted as they are.

Why mount rather than rewrite: `rabbit_store.cli.add_subcommands` exists for this, so `rabbit split`
and `rabbit-store split` take the same options and print the same thing; the library functions
underneath are `rabbit_store.inspect.describe`, `split_checkpoint` and `verify_split`. Our common
options (--quiet, --debug, -v) are added to each where the store did not define them already.
"""

from __future__ import annotations

import argparse
from typing import Any

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


def _store_runner(func: Any) -> Any:
    """Adapt a store command `func(args) -> int` to our `run(args, console) -> int`."""

    def run(args: argparse.Namespace, console: Any) -> int:
        if hasattr(args, "token") and args.token:
            console.add_secrets([args.token])
        return int(func(args))

    return run
