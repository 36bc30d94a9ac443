"""The Source protocol: files under a model location that can be listed and range-read by name.

Everything above the sources (index, reader, split, verify) talks to this class only; which
backend serves the bytes is decided once, by `open_source` (see registry.py).
"""

from __future__ import annotations

import json
import posixpath
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, BinaryIO

from ..errors import InvalidCheckpointError, InvalidOptionError

#: `scheme://` or `scheme::` at the start of a location (a URL or a chained fsspec URL).
SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)(::|://)")
_DRIVE = re.compile(r"^[A-Za-z]:")


def relative_name(name: object, *, where: str = "file name") -> str:
    """Normalise a file name inside a model directory; refuse anything that could escape it.

    Index files come from the internet: `../x`, `/etc/passwd`, `C:\\x` or `s3://other/x` in a
    weight_map must never make us read (or delete) outside the checkpoint.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidCheckpointError(f"{where}: {name!r} is not a file name.")
    if "\\" in name or "\x00" in name:
        raise InvalidCheckpointError(
            f"{where}: {name!r} contains a backslash or NUL; only plain relative names are allowed."
        )
    if SCHEME.match(name) or name.startswith("/") or _DRIVE.match(name):
        raise InvalidCheckpointError(
            f"{where}: {name!r} is an absolute path or URL; it must be a name relative to the "
            "model directory."
        )
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise InvalidCheckpointError(
            f"{where}: {name!r} points outside the model directory; only names inside it are "
            "allowed."
        )
    return normal


def display_url(url: str) -> str:
    """Drop `user:password@` from a URL so that a location can be logged."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", url)


class Source(ABC):
    """A model location: files that can be listed and range-read by name.

    Names are relative to the model directory with `/` separators. `location` is for display and
    never contains a token or secret.
    """

    location: str

    @abstractmethod
    def list_files(self) -> list[str]:
        """Every file under the location (relative names, sorted)."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def cat_ranges(
        self, names: Sequence[str], starts: Sequence[int], ends: Sequence[int]
    ) -> list[bytes]:
        """Bytes [start, end) of each named file; backends read the ranges concurrently."""

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A sequential binary stream (for copying whole small files)."""

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON object file; malformed JSON is an InvalidCheckpointError naming the file."""
        try:
            value = json.loads(self.read_bytes(name))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidCheckpointError(
                f"{self.location}/{name} is not valid JSON ({exc}); re-download it."
            ) from None
        if not isinstance(value, dict):
            raise InvalidCheckpointError(
                f"{self.location}/{name} holds a JSON {type(value).__name__}, expected an object."
            )
        return value

    def local_path(self, name: str) -> str | None:
        """A local file holding `name` (local dir, file://, hub cache), or None when remote."""
        return None

    def version(self, name: str) -> str:
        """What tells this file's content apart without reading it (modification time and inode,
        an ETag, a commit), for caches derived from it; "" when the backend says nothing. Headers
        alone do not: two checkpoints of one architecture have identical ones."""
        return ""

    def delete(self, name: str) -> None:
        """Remove a file (split's delete_original). Backends that cannot delete raise."""
        raise InvalidOptionError(f"{self.location} does not support deleting {name}.")

    def close(self) -> None:  # noqa: B027 - optional hook: a no-op unless a backend holds resources
        """Release connections or caches (no-op by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
