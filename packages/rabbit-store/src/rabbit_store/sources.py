"""Where a checkpoint's files live: one Source protocol, backends chosen by URL scheme.

Shaped like fsspec (and built on it): `open_source` looks at the scheme of a location and hands it
to the opener registered for that scheme; everything above (index, reader, split) talks to the
`Source` protocol only. A new backend is a new opener in `_OPENERS`, not an `if` elsewhere.

- local directory, `file://`, `memory://`, `s3://` (s3fs), chained URLs (`blockcache::s3://...`)
  and every other fsspec protocol: `FsspecSource`;
- hub repos (`org/name`, `hf://org/name[@revision]`): `rabbit_store.hub`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import random
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import (
    AccessDeniedError,
    CheckpointNotFoundError,
    InvalidCheckpointError,
    InvalidOptionError,
    MissingDependencyError,
    RabbitError,
    StorageError,
)

logger = logging.getLogger(__name__)

#: A bare `org/name` (no scheme) that is not an existing local path is taken for a hub repo id.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)(::|://)")
_DRIVE = re.compile(r"^[A-Za-z]:")


def default_remote_cache_dir() -> str:
    """Where `local_cache=True` keeps blocks of remote files: `remote/` under RabbitLLM's cache
    ($RABBITLLM_CACHE, else $XDG_CACHE_HOME/rabbitllm, else ~/.cache/rabbitllm), read at call time."""
    base = os.environ.get("RABBITLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "rabbitllm",
    )
    return os.path.join(base, "remote")


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
    if _SCHEME.match(name) or name.startswith("/") or _DRIVE.match(name):
        raise InvalidCheckpointError(
            f"{where}: {name!r} is an absolute path or URL; it must be a name relative to the "
            "model directory."
        )
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise InvalidCheckpointError(
            f"{where}: {name!r} points outside the model directory; only names inside it are allowed."
        )
    return normal


#: errno values of a full destination: no space, quota exceeded, file-size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _missing_credentials(exc: BaseException) -> bool:
    """botocore's NoCredentialsError / PartialCredentialsError (not OSErrors), without importing it."""
    module = sys.modules.get("botocore.exceptions")
    names = ("NoCredentialsError", "PartialCredentialsError")
    kinds = tuple(k for k in (getattr(module, n, None) for n in names) if isinstance(k, type))
    return bool(kinds) and isinstance(exc, kinds)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn backend exceptions (fsspec maps most to OSError subclasses) into RabbitErrors."""
    try:
        yield
    except RabbitError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{what}: not found ({exc}); check the location.") from exc
    except PermissionError as exc:
        raise AccessDeniedError(
            f"{what}: access denied ({exc}); check the credentials (storage_options / --token)."
        ) from exc
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise StorageError(
                f"{what}: no space left on the device ({os.strerror(exc.errno)}); free some space "
                "there or choose another destination."
            ) from exc
        raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if _missing_credentials(exc):
            raise AccessDeniedError(
                f"{what}: no credentials found ({exc}); pass storage_options={{'key': ..., 'secret': ...}} "
                "(--storage-option key=... --storage-option secret=...), set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or use anon=True for a public bucket."
            ) from exc
        raise


#: Attempts of one remote read before giving up; only transient errors are retried.
READ_ATTEMPTS = 5
#: Backoff before retry k (1-based): RETRY_BASE_DELAY * 2**(k-1), capped at RETRY_MAX_DELAY, times a
#: random factor in [0.5, 1.5) so that many readers do not retry in lockstep.
RETRY_BASE_DELAY = 0.25
RETRY_MAX_DELAY = 8.0
#: errno values a backend uses for a failure worth retrying (s3fs: 503 SlowDown -> EBUSY, 500 ->
#: EREMOTEIO; sockets: resets, timeouts).
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        errno.EREMOTEIO,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EAGAIN,
    }
)
#: Connection-level exception types of the HTTP clients fsspec backends use, looked up only when
#: that client is already imported (it raised the error, so it is).
_CLIENT_ERRORS = (
    ("aiohttp", ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError")),
    ("httpx", ("TransportError",)),
    ("requests", ("ConnectionError", "Timeout")),
    (
        "botocore.exceptions",
        ("HTTPClientError", "ConnectionError", "ReadTimeoutError", "ResponseStreamingError"),
    ),
)

T = TypeVar("T")


def _status_code(exc: BaseException) -> int | None:
    for value in (
        getattr(exc, "status", None),
        getattr(exc, "status_code", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if isinstance(value, int):
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can cure: connection resets, timeouts, HTTP 5xx and 429."""
    if isinstance(exc, RabbitError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    status = _status_code(exc)
    if status is not None:
        return status >= 500 or status == 429
    for module_name, names in _CLIENT_ERRORS:
        module = sys.modules.get(module_name)
        kinds = tuple(k for k in (getattr(module, n, None) for n in names) if isinstance(k, type))
        if kinds and isinstance(exc, kinds):
            return True
    return False


def with_retries(what: str, call: Callable[[], T]) -> T:
    """`call()`, retried with exponential backoff and jitter while it fails transiently.

    Each retry logs a warning. Other errors are not retried; errors, and the last transient one,
    come out as RabbitErrors naming `what` (see storage_errors).
    """
    with storage_errors(what):
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == READ_ATTEMPTS:
                    raise StorageError(
                        f"{what}: {type(exc).__name__}: {exc} (still failing after {READ_ATTEMPTS} "
                        "attempts); check the network and the storage service, then retry."
                    ) from exc
                delay = min(
                    RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (attempt - 1)
                ) * random.uniform(0.5, 1.5)
                logger.warning(
                    "%s: %s: %s; retrying in %.3f s (attempt %d of %d)",
                    what,
                    type(exc).__name__,
                    exc,
                    delay,
                    attempt + 1,
                    READ_ATTEMPTS,
                )
                time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


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

    def delete(self, name: str) -> None:
        """Remove a file (split's delete_original). Backends that cannot delete raise."""
        raise InvalidOptionError(f"{self.location} does not support deleting {name}.")

    def close(self) -> None:
        """Release connections or caches (no-op by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


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

    def delete(self, name: str) -> None:
        with storage_errors(f"deleting {self.location}/{name}"):
            self.fs.rm_file(self._path(name))


def display_url(url: str) -> str:
    """Drop `user:password@` from a URL so that a location can be logged."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", url)


Opener = Callable[..., Source]


def _open_fsspec(
    location: str,
    *,
    revision: str | None,
    token: str | None,
    storage_options: dict[str, Any] | None,
    cache_dir: str | None,
    local_cache: bool | str | os.PathLike[str],
) -> Source:
    """Every fsspec URL: the protocol's filesystem, optionally wrapped in a local block cache."""
    if revision is not None:
        raise InvalidOptionError(
            f"revision={revision!r} applies to hub repos only; {location} is not one "
            "(drop the revision, or use hf://org/name)."
        )
    try:
        fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    except ImportError as exc:
        scheme = location.split(":", 1)[0]
        extra = " (pip install 'rabbit-store[s3]')" if scheme in ("s3", "s3a") else ""
        raise MissingDependencyError(
            f"{location}: the backend for {scheme!r} is not installed{extra}: {exc}"
        ) from exc
    except ValueError as exc:
        raise InvalidOptionError(f"{location}: {exc}") from exc
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


def _open_hub(location: str, **options: Any) -> Source:
    from .hub import open_hub  # huggingface_hub is imported only when a hub repo is opened

    return open_hub(location, **options)


def _open_local(location: str, **options: Any) -> Source:
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


#: scheme -> opener; "" is a plain local path. Unknown schemes go to fsspec.
_OPENERS: dict[str, Opener] = {"": _open_local, "hf": _open_hub}


def register_opener(scheme: str, opener: Opener) -> None:
    """Add (or replace) the backend used for `scheme://` locations."""
    _OPENERS[scheme] = opener


def open_source(
    location: str | os.PathLike[str] | Source,
    *,
    revision: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    local_cache: bool | str | os.PathLike[str] = False,
) -> Source:
    """Resolve a model location into a Source.

    `location`: a local directory, `org/name` or `hf://org/name[@revision]` (hub; `token`, HF_TOKEN,
    the hub cache and HF_HUB_OFFLINE are honoured), `s3://bucket/prefix` (s3fs; `storage_options`
    such as endpoint_url, key, secret), or any other fsspec URL. `local_cache` (True or a directory)
    keeps blocks read from a remote store on local disk. A Source is returned unchanged.
    """
    if isinstance(location, Source):
        return location
    location = os.fspath(location)
    match = _SCHEME.match(location)
    scheme = match.group(1).lower() if match and match.group(2) == "://" else ""
    if match and match.group(2) == "::":
        scheme = "chained"  # e.g. blockcache::s3://... : fsspec resolves the chain
    if (
        not scheme
        and not os.path.exists(os.path.expanduser(location))
        and HUB_REPO_ID.match(location)
    ):
        scheme = "hf"
    if scheme not in ("hf", "") and token is not None:
        logger.debug("token= is for hub repos; ignored for %s", display_url(location))
    opener = _OPENERS.get(scheme, _open_fsspec)
    return opener(
        location,
        revision=revision,
        token=token,
        storage_options=storage_options,
        cache_dir=cache_dir,
        local_cache=local_cache,
    )
