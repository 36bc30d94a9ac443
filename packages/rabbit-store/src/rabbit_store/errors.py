"""Every error the project raises on purpose derives from RabbitError.

Why types rather than messages: callers (the engine, the `rabbit` CLI) branch on the kind of failure
(a missing shard is not a corrupt header), and the CLIs turn any RabbitError into one clear line and
exit status 2 while a genuine bug keeps its traceback. Every message names the file, tensor or
option concerned and says what to do next.
"""

from __future__ import annotations


class RabbitError(Exception):
    """Base class of every error RabbitLLM raises for a user-fixable problem."""


class InvalidOptionError(RabbitError, ValueError):
    """An argument or option has a value that cannot work (also a ValueError for plain callers).

    `option` names the keyword at fault, so a front end (the CLI) can name its own spelling of it
    (`--max-memory`) without parsing the message.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class UnknownSchemeError(InvalidOptionError):
    """No backend serves the scheme of a location (neither a registered opener nor fsspec)."""


class MissingDependencyError(RabbitError, ImportError):
    """An optional backend is not installed (e.g. s3fs for s3:// URLs)."""


class StorageError(RabbitError, OSError):
    """Reading from or writing to a storage backend failed (permissions, network, ...)."""


class AccessDeniedError(StorageError):
    """The backend refused access: gated or private hub repo, missing or wrong credentials."""


class CheckpointNotFoundError(RabbitError, FileNotFoundError):
    """The model location, or the checkpoint files it should contain, do not exist."""


class RevisionNotFoundError(CheckpointNotFoundError):
    """The hub repo exists but not the requested revision (branch, tag or commit)."""


class ShardNotFoundError(CheckpointNotFoundError):
    """The checkpoint index names shard files that are not there."""


class InvalidCheckpointError(RabbitError):
    """The checkpoint exists but its files contradict the safetensors format or each other."""


class HeaderError(InvalidCheckpointError):
    """A safetensors header is malformed (length, JSON, dtype, shape, offsets)."""


class IndexFileError(InvalidCheckpointError):
    """model.safetensors.index.json is malformed or names files outside the model directory."""


class LayerLayoutError(InvalidCheckpointError):
    """The decoder-layer layout cannot be determined (no `<prefix>.<int>.` keys, bad prefix)."""


class IncompleteLayerError(LayerLayoutError):
    """Decoder layers are missing from the checkpoint (the indices are not 0..N-1)."""


class SplitError(RabbitError):
    """A split directory is missing, inconsistent with its manifest, or cannot be written."""


class ManifestNotFoundError(SplitError, FileNotFoundError):
    """The destination holds no rabbit-split.json: it is not a finished split."""


class SplitCorruptedError(SplitError):
    """Files of a split do not match their manifest (size, header or sha256)."""

    def __init__(self, message: str, files: list[str] | None = None) -> None:
        super().__init__(message)
        self.files = list(files or [])
