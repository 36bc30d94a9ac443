"""Errors the CLI raises itself; they derive from RabbitError: one handler makes them exit 2."""

from __future__ import annotations

from rabbit_store.errors import RabbitError

# An unexpected error: a bug, or a failure the user cannot fix by changing arguments.
EXIT_FAILURE = 1
EXIT_USAGE = 2  # a user error: bad argument, bad path, unsupported model, any RabbitError
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


class UsageError(RabbitError):
    """A command-line argument is missing or has a value that cannot work."""


class TokenizerNotFoundError(RabbitError):
    """The model has no tokenizer files; text commands need one (the library itself takes token
    ids)."""


class FeatureNotAvailableError(RabbitError):
    """A command needs something this installation does not have (e.g. tools/rabbit_bench)."""
