"""Hugging Face hub repos as Sources, through huggingface_hub.

Online: one `repo_info` call pins the revision to a commit and lists files with sizes; shards are
downloaded lazily, one file at a time, by `hf_hub_download` into the hub cache the first time
something needs the whole file (`local_path`), so `local_path` of a hub file *is* the cached file
and everything after the first read is local. Header reads of files not cached yet are HTTP range
reads (`HfFileSystem`), so indexing a 400 GB repo downloads nothing but a few KB per shard.

Offline (HF_HUB_OFFLINE=1, or the hub unreachable): the cached snapshot folder, found by
`snapshot_download(local_files_only=True)`, is a local directory like any other.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

import huggingface_hub
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from ..constants import HF_HUB_CACHE_ENV, HF_HUB_OFFLINE_ENV, env_flag
from ..errors import (
    AccessDeniedError,
    CheckpointNotFoundError,
    InvalidOptionError,
    RevisionNotFoundError,
    StorageError,
)
from .base import Source, relative_name
from .fsspec_source import FsspecSource

logger = logging.getLogger(__name__)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now as well as at huggingface_hub's import.

    huggingface_hub reads its environment once, at import; reading the variable again here lets a
    process (or a test, or a notebook) that sets it later still be honoured.
    """
    return bool(hf_constants.HF_HUB_OFFLINE) or env_flag(HF_HUB_OFFLINE_ENV)


def hub_cache_dir(cache_dir: str | None = None) -> str:
    """The explicit cache_dir, else HF_HUB_CACHE read now, else huggingface_hub's own default."""
    return cache_dir or os.environ.get(HF_HUB_CACHE_ENV) or hf_constants.HF_HUB_CACHE


def parse_hub_location(location: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` or `org/name` -> (repo_id, revision from the URL or None)."""
    rest = location[len("hf://") :] if location.lower().startswith("hf://") else location
    rest = rest.strip("/")
    if rest.startswith("models/"):
        rest = rest[len("models/") :]
    repo_id, _, revision = rest.partition("@")
    return repo_id, (revision or None)


@contextmanager
def _hub_errors(what: str, repo_id: str, revision: str) -> Iterator[None]:
    """Map huggingface_hub's typed errors onto ours, keeping what-to-do advice."""
    try:
        yield
    except hf_errors.RevisionNotFoundError as exc:
        raise RevisionNotFoundError(
            f"{what}: revision {revision!r} does not exist in {repo_id}; pass an existing branch, "
            "tag or commit (--revision)."
        ) from exc
    except hf_errors.GatedRepoError as exc:
        raise AccessDeniedError(
            f"{what}: {repo_id} is gated; accept its terms on huggingface.co and pass a token "
            "(token=, --token or HF_TOKEN)."
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{what}: repo {repo_id} not found on the hub (or private: pass token=, --token or set "
            "HF_TOKEN); for a local directory, check the path."
        ) from exc
    except hf_errors.EntryNotFoundError as exc:  # local or remote: the file is not there
        raise CheckpointNotFoundError(f"{what}: not in {repo_id}@{revision}.") from exc
    except hf_errors.HFValidationError as exc:
        raise InvalidOptionError(f"{what}: {exc}") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise AccessDeniedError(
                f"{what}: the hub refused access (HTTP {status}); pass a valid token (token=, "
                "--token or HF_TOKEN)."
            ) from exc
        raise StorageError(f"{what}: hub request failed: {exc}") from exc


class HubSource(Source):
    """An online hub repo pinned to one commit; files fetched lazily into the hub cache."""

    def __init__(
        self,
        repo_id: str,
        commit: str,
        files: dict[str, int],
        *,
        token: str | None,
        cache_dir: str,
    ) -> None:
        self.repo_id = repo_id
        self.commit = commit
        self._files = files
        self._token = token
        self._cache_dir = cache_dir
        self._paths: dict[str, str] = {}
        self.location = f"hf://{repo_id}@{commit}"

    def list_files(self) -> list[str]:
        return sorted(self._files)

    def exists(self, name: str) -> bool:
        return relative_name(name) in self._files

    def version(self, name: str) -> str:
        return self.commit  # a commit pins every file's content

    def size(self, name: str) -> int:
        try:
            return self._files[relative_name(name)]
        except KeyError:
            raise CheckpointNotFoundError(f"{self.location}: no file {name}.") from None

    def _cached(self, name: str) -> str | None:
        if name in self._paths:
            return self._paths[name]
        found = huggingface_hub.try_to_load_from_cache(
            self.repo_id, name, cache_dir=self._cache_dir, revision=self.commit
        )
        return found if isinstance(found, str) else None

    def local_path(self, name: str) -> str:
        """Download `name` into the hub cache on first use (atomic, locked by huggingface_hub)."""
        name = relative_name(name)
        if name not in self._paths:
            with _hub_errors(f"{self.location}/{name}", self.repo_id, self.commit):
                self._paths[name] = huggingface_hub.hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.commit,
                    token=self._token,
                    cache_dir=self._cache_dir,
                )
        return self._paths[name]

    def cat_ranges(
        self, names: Sequence[str], starts: Sequence[int], ends: Sequence[int]
    ) -> list[bytes]:
        out: list[bytes | None] = [None] * len(names)
        remote: list[int] = []
        for i, name in enumerate(names):
            cached = self._cached(relative_name(name))
            if cached is None:
                remote.append(i)
                continue
            with open(cached, "rb") as handle:
                handle.seek(starts[i])
                out[i] = handle.read(ends[i] - starts[i])
        if remote:
            fs = huggingface_hub.HfFileSystem(token=self._token)
            paths = [f"{self.repo_id}@{self.commit}/{relative_name(names[i])}" for i in remote]
            with _hub_errors(self.location, self.repo_id, self.commit):
                got = fs.cat_ranges(
                    paths, [starts[i] for i in remote], [ends[i] for i in remote], on_error="raise"
                )
            for i, data in zip(remote, got, strict=True):
                out[i] = data
        return [b"" if data is None else data for data in out]

    def open(self, name: str) -> BinaryIO:
        return open(self.local_path(name), "rb")

    def delete(self, name: str) -> None:
        cached = self._cached(relative_name(name))
        if cached is not None:
            delete_cached_file(cached)
            self._paths.pop(relative_name(name), None)


class HubCacheSource(FsspecSource):
    """A cached snapshot folder (offline): local files, hub-style location and deletion."""

    def __init__(self, repo_id: str, snapshot: str) -> None:
        super().__init__(
            LocalFileSystem(), snapshot, location=f"hf://{repo_id}@{os.path.basename(snapshot)}"
        )
        self.repo_id = repo_id

    def delete(self, name: str) -> None:
        delete_cached_file(self._path(name))


def delete_cached_file(path: str) -> None:
    """Remove a hub-cache file: the blob the snapshot symlink points to, then the link itself."""
    if os.path.islink(path):
        blob = os.path.realpath(path)
        if os.path.exists(blob):
            os.remove(blob)
    if os.path.lexists(path):
        os.remove(path)


def _connection_error_types() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP client this huggingface_hub version uses."""
    kinds: list[type[BaseException]] = [OSError, hf_errors.OfflineModeIsEnabled]
    for module in ("httpx2", "httpx", "requests"):
        try:
            client = importlib.import_module(module)
        except ImportError:
            continue
        kind = getattr(client, "TransportError", None) or getattr(client, "ConnectionError", None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


_CONNECTION_ERRORS = _connection_error_types()
#: huggingface_hub >= 1.x raises it for a snapshot known to miss files; older versions never do.
_INCOMPLETE_SNAPSHOT = getattr(hf_errors, "IncompleteSnapshotError", ())


def _cached_snapshot(repo_id: str, revision: str, cache_dir: str, reason: str) -> str:
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
    except _INCOMPLETE_SNAPSHOT as exc:
        # Files are missing from the cached snapshot; the index will name the missing shard if one
        # is needed, and config/tokenizer files we may not need are no reason to refuse.
        logger.warning("hub cache snapshot of %s is incomplete: %s", repo_id, exc)
        return exc.snapshot_path
    except hf_errors.LocalEntryNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"hf://{repo_id}@{revision} is not in the hub cache {cache_dir} and {reason}: download "
            f"it while online (hf download {repo_id}), or point cache_dir / HF_HUB_CACHE at the "
            "cache that holds it."
        ) from exc
    except hf_errors.HFValidationError as exc:
        raise InvalidOptionError(f"{repo_id}: {exc}") from exc


def open_hub(
    location: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    local_cache: bool | str = False,
) -> Source:
    """Open `org/name` / `hf://org/name[@rev]` online (lazy downloads) or from the hub cache."""
    del storage_options, local_cache  # hub files are cached locally by huggingface_hub already
    repo_id, url_revision = parse_hub_location(location)
    if revision and url_revision and revision != url_revision:
        raise InvalidOptionError(
            f"{location} names revision {url_revision!r} but revision={revision!r} was passed too; "
            "give one of them."
        )
    revision = revision or url_revision or "main"
    cache = hub_cache_dir(cache_dir)
    if hub_offline():
        return HubCacheSource(
            repo_id, _cached_snapshot(repo_id, revision, cache, "HF_HUB_OFFLINE is set")
        )
    try:
        with _hub_errors(f"hf://{repo_id}", repo_id, revision):
            info = huggingface_hub.HfApi(token=token).repo_info(
                repo_id, revision=revision, files_metadata=True
            )
    except AccessDeniedError:
        raise
    except (StorageError, *_CONNECTION_ERRORS) as exc:
        # What hf_hub_download does too: no hub, but maybe a cached copy.
        logger.warning("hub unreachable for %s (%s); using the hub cache", repo_id, exc)
        reason = f"the hub could not be reached ({type(exc).__name__}: {exc})"
        return HubCacheSource(repo_id, _cached_snapshot(repo_id, revision, cache, reason))
    files = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    return HubSource(repo_id, str(info.sha), files, token=token, cache_dir=cache)
