"""The `rabbit` command: a thin layer over the library (`rabbitllm`, `rabbit_store`).

Entry point `rabbit = "rabbitllm.cli:main"`. Every subcommand lives in its own module and imports
its heavy dependencies (torch, transformers, the engine) only when it runs, so `rabbit --help` and
usage errors stay quick.
"""

from rabbitllm.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
