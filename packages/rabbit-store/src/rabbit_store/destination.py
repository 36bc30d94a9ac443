"""Where a split is written: any fsspec URL, with atomic writes and a lock (a file lock locally,
an exclusively created lock object on stores that support it, see remote_lock.py).

Local files are written under a temporary name (`.NAME.<random>.incomplete`) and renamed into
place, so a file under its final name is always whole. Object stores (s3, gcs, memory, ...) make
an object visible only when its upload completes, so they are written directly; a failed upload is
discarded. Either way the split trusts a file only once its sha256 is in the resume record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import filelock
import fsspec
from fsspec.implementations.local import LocalFileSystem

from .constants import SPLIT_LOCK_FILE, TEMP_SUFFIX
from .errors import InvalidOptionError, MissingDependencyError
from .remote_lock import RemoteLock
from .sources import FsspecSource, display_url, relative_name, storage_errors

logger = logging.getLogger(__name__)


def write_all(handle: IO[bytes], data: bytes | memoryview) -> None:
    """Write every byte: an unbuffered file may take only part of a write (a disk filling up)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = handle.write(view)
        if done is None:  # a buffered writer that took everything
            return
        if done == 0:
            raise OSError(errno.EIO, "the destination accepted no bytes")
        view = view[done:]


class Destination:
    """A directory on any fsspec filesystem that split files are written into."""

    def __init__(
        self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> None:
        url = os.fspath(url)
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as exc:
            raise MissingDependencyError(
                f"{display_url(url)}: the backend is not installed (for s3://: "
                f"pip install 'rabbit-store[s3]'): {exc}"
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidOptionError(f"{display_url(url)}: bad storage options: {exc}") from exc
        self.fs: fsspec.AbstractFileSystem = fs
        self.local = isinstance(fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        self.location = self.root if self.local else display_url(url)
        #: The same directory read as a Source: what verification and resume read files through.
        self.source = FsspecSource(fs, self.root, location=self.location)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, relative_name(name))

    def makedirs(self) -> None:
        with storage_errors(f"creating {self.location}"):
            self.fs.makedirs(self.root, exist_ok=True)

    def lock(self) -> contextlib.AbstractContextManager[object]:
        """Serialise splits into the same destination: a second one waits for the first."""
        if self.local:
            return filelock.FileLock(os.path.join(self.root, SPLIT_LOCK_FILE))
        return RemoteLock(self.fs, self.path(SPLIT_LOCK_FILE), location=self.location)

    def remove(self, name: str) -> None:
        with storage_errors(f"removing {self.location}/{name}"):
            if self.fs.exists(self.path(name)):
                self.fs.rm_file(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_atomic(name) as handle:
            write_all(handle, data)

    def remove_temporaries(self) -> int:
        """Delete `.*.incomplete` leftovers of interrupted local writes (call under the lock)."""
        if not self.local:
            return 0
        removed = 0
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                os.remove(entry.path)
                removed += 1
        if removed:
            logger.info("removed %d incomplete file(s) left in %s", removed, self.location)
        return removed

    @contextlib.contextmanager
    def open_atomic(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file that appears under `name` only if the block completes."""
        final = self.path(name)
        if self.local:
            temp = os.path.join(
                os.path.dirname(final),
                f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}",
            )
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                with open(temp, "wb", buffering=0) as handle:
                    yield handle
                os.replace(temp, final)
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
            return
        with storage_errors(f"writing {self.location}/{name}"):
            handle = self.fs.open(final, "wb")
            try:
                yield handle
            except BaseException:
                # fsspec files commit on close(); discard() aborts the upload instead.
                with contextlib.suppress(Exception):
                    handle.discard()
                with contextlib.suppress(Exception):
                    self.fs.rm_file(final)
                raise
            handle.close()
