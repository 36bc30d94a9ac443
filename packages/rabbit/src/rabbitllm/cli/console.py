"""Everything the CLI writes goes through here: results on stdout, messages on stderr, secrets
redacted.

Why one object: `--quiet`, `--debug` and the secrets to hide (the `--token` value, secret-looking
storage options) are decided once per run; commands receive the Console instead of reading globals,
and no line can reach the terminal without passing the redaction.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

REDACTED = "***"
#: storage-option keys whose values are credentials (matched as substrings, case-insensitively)
SECRET_KEY_PARTS = ("token", "secret", "password", "passwd", "credential", "key")


def secret_values(token: str | None, storage_options: dict[str, Any] | None) -> list[str]:
    """The strings that must never be printed: the token and secret-looking storage option
    values."""
    found: list[str] = [token] if isinstance(token, str) and token else []

    def walk(options: dict[str, Any]) -> None:
        for key, value in options.items():
            if isinstance(value, dict):
                walk(value)
            elif (
                isinstance(value, str)
                and value
                and any(p in str(key).lower() for p in SECRET_KEY_PARTS)
            ):
                found.append(value)

    walk(storage_options or {})
    return found


@dataclass
class Console:
    """Output of one CLI run."""

    quiet: bool = False
    debug: bool = False
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    _secrets: list[str] = field(default_factory=list)

    def add_secrets(self, values: Iterable[str]) -> None:
        """Hide these strings from every later message (longest first, so overlaps redact whole)."""
        self._secrets = sorted({*self._secrets, *(v for v in values if v)}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def result(self, text: str = "", *, end: str = "\n") -> None:
        """A command's result (stdout): always shown, even with --quiet."""
        self.stdout.write(self.redact(text) + end)
        self.stdout.flush()

    def note(self, text: str) -> None:
        """A side remark (stderr) such as timings; hidden by --quiet."""
        if not self.quiet:
            self.stderr.write(self.redact(text) + "\n")
            self.stderr.flush()

    def report(self, text: str) -> None:
        """Something the user asked for on stderr (e.g. --profile): shown even with --quiet."""
        self.stderr.write(self.redact(text) + "\n")
        self.stderr.flush()

    def error(self, message: str, exc: BaseException | None = None) -> None:
        """One line `rabbit: error: ...` on stderr; with --debug the traceback first."""
        if self.debug and exc is not None:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.stderr.write(self.redact(tb))
        first_line = " ".join(
            str(message).split()
        )  # a message is one line, whatever the library wrote
        self.stderr.write(self.redact(f"rabbit: error: {first_line}") + "\n")
        self.stderr.flush()

    def logging_handler(self) -> logging.Handler:
        handler = logging.StreamHandler(self.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_RedactFilter(self))
        return handler


class _RedactFilter(logging.Filter):
    """Rewrites each record's message with the secrets redacted (libraries may log URLs,
    options...)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.console.redact(record.getMessage())
        record.args = None
        if record.exc_info and not self.console.debug:
            record.exc_info = None
        return True


def configure_logging(console: Console, verbose: bool) -> None:
    """Route library logs and Python warnings to stderr through the redaction filter.

    Default level WARNING (libraries stay quiet), -v INFO, --debug DEBUG; --quiet also lowers
    transformers' own verbosity to errors, since its advisory warnings are noise for a script.
    """
    level = logging.DEBUG if console.debug else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(console.logging_handler())
    root.setLevel(level)
    logging.captureWarnings(True)
    try:  # transformers logs through its own handler; send its records through ours instead
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.ERROR if console.quiet else logging.WARNING)


def disable_progress_bars() -> None:
    """Turn off the progress bars of the libraries we call (for --quiet).

    tqdm reads TQDM_DISABLE only when it is imported, so in this process the libraries are switched
    off through their own controls; the variable still reaches child processes (rabbit bench).
    """
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars as hub_disable

        hub_disable()
    except ImportError:
        pass
