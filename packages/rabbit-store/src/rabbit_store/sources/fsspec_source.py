"""Every fsspec filesystem as a Source: local, memory, s3 (s3fs), chained caches, any protocol.

Remote reads go through `with_retries`, so a dropped connection or a 503 costs a retry, not a run.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..constants import remote_cache_dir
from ..errors import CheckpointNotFoundError, InvalidOptionError, MissingDependencyError
from .base import Source, display_url, relative_name
from .retry import storage_errors, with_retries

logger = logging.getLogger(__name__)


#: fs.info() keys that change when a file's content does (local: mtime and inode; S3 and most
#: object stores: ETag and modification time; others: whatever of these they report).
_VERSION_KEYS = ("size", "mtime", "ino", "ETag", "etag", "LastModified", "last_modified", "md5")


def default_remote_cache_dir() -> str:
    """Where `local_cache=True` keeps blocks of remote files (constants.remote_cache_dir)."""
    return str(remote_cache_dir())


class FsspecSource(Source):
    """Any fsspec filesystem plus a root directory: local, memory, s3, chained caches, ..."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, *, location: str | None = None):
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.location = location or display_url(fs.unstrip_protocol(self.root))
        self._local = isinstance(fs, LocalFileSystem)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, relative_name(name))

    def list_files(self) -> list[str]:
        found = with_retries(self.location, lambda: self.fs.find(self.root))
        prefix = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def exists(self, name: str) -> bool:
        path = self._path(name)
        return bool(with_retries(f"{self.location}/{name}", lambda: self.fs.isfile(path)))

    def size(self, name: str) -> int:
        path = self._path(name)
        return int(with_retries(f"{self.location}/{name}", lambda: self.fs.size(path)))

    def cat_ranges(
        self, names: Sequence[str], starts: Sequence[int], ends: Sequence[int]
    ) -> list[bytes]:
        if not names:
            return []
        paths = [self._path(n) for n in names]
        what = f"{self.location} ({', '.join(sorted(set(names)))})"
        return with_retries(
            what,
            lambda: list(self.fs.cat_ranges(paths, list(starts), list(ends), on_error="raise")),
        )

    def read_bytes(self, name: str) -> bytes:
        path = self._path(name)
        return bytes(with_retries(f"{self.location}/{name}", lambda: self.fs.cat_file(path)))

    def open(self, name: str) -> BinaryIO:
        with storage_errors(f"{self.location}/{name}"):
            return self.fs.open(self._path(name), "rb")

    def local_path(self, name: str) -> str | None:
        return self._path(name) if self._local else None

    def version(self, name: str) -> str:
        path = self._path(name)
        info = with_retries(f"{self.location}/{name}", lambda: self.fs.info(path))
        stamps = [f"{key}={info[key]}" for key in _VERSION_KEYS if info.get(key) is not None]
        return ";".join(stamps)

    def delete(self, name: str) -> None:
        with storage_errors(f"deleting {self.location}/{name}"):
            self.fs.rm_file(self._path(name))


def open_fsspec(
    location: str,
    *,
    revision: str | None,
    token: str | None,
    storage_options: dict[str, Any] | None,
    cache_dir: str | None,
    local_cache: bool | str | os.PathLike[str],
) -> Source:
    """Every fsspec URL: the protocol's filesystem, optionally wrapped in a local block cache."""
    del token  # for hub repos only (open_source logs that it is ignored here)
    if revision is not None:
        raise InvalidOptionError(
            f"revision={revision!r} applies to hub repos only; {display_url(location)} is not "
            "one (drop the revision, or use hf://org/name)."
        )
    try:
        fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    except ImportError as exc:
        scheme = location.split(":", 1)[0]
        extra = " (pip install 'rabbit-store[s3]')" if scheme in ("s3", "s3a") else ""
        raise MissingDependencyError(
            f"{display_url(location)}: the backend for {scheme!r} is not installed{extra}: {exc}"
        ) from exc
    except ValueError as exc:
        raise InvalidOptionError(f"{display_url(location)}: {exc}") from exc
    display = display_url(location)
    if local_cache and not isinstance(fs, LocalFileSystem):
        # fsspec's CachingFileSystem ("blockcache") keeps the blocks we read in sparse local files,
        # so a second pass over the same layers reads local disk; no need to write our own cache.
        storage = (
            cache_dir or default_remote_cache_dir()
            if local_cache is True
            else os.fspath(local_cache)
        )
        fs = fsspec.filesystem("blockcache", fs=fs, cache_storage=storage, check_files=False)
        logger.info("caching blocks of %s under %s", display, storage)
    source = FsspecSource(fs, root, location=display)
    with storage_errors(display):
        if not fs.isdir(root):
            raise CheckpointNotFoundError(
                f"{display}: no such directory; check the location (and storage_options for "
                "remote stores)."
            )
    return source
