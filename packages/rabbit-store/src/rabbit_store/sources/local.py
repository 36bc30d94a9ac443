"""Plain local directories (no scheme): the local filesystem through fsspec, path checked first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from ..errors import CheckpointNotFoundError, InvalidOptionError
from .base import Source
from .fsspec_source import FsspecSource


def open_local(location: str, **options: Any) -> Source:
    """A local directory; `~` is expanded, and a missing directory is refused by name."""
    if options.get("revision") is not None:
        raise InvalidOptionError(
            f"revision={options['revision']!r} applies to hub repos only; {location} is a local "
            "directory (drop the revision)."
        )
    path = os.path.abspath(os.path.expanduser(location))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"{location}: is not a directory; pass the directory that holds the checkpoint."
        )
    return FsspecSource(LocalFileSystem(), Path(path).as_posix(), location=path)
