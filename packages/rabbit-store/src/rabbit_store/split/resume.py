"""Resuming a split: what an earlier run left, and which of its files can be kept.

A file is reused only when the resume record lists it with the same tensors and size *and* the file
on the destination passes `verify.check_file` (size, header, sha256): the same checks that loading
and `rabbit verify` make, from the same module.
"""

from __future__ import annotations

import logging

from .. import verify
from ..constants import MANIFEST_FILE, PARTIAL_MANIFEST_FILE
from ..destination import Destination
from ..errors import ShardNotFoundError
from ..index import CheckpointIndex
from ..manifest import FileEntry, Manifest, load_manifest
from ..sources import Source

logger = logging.getLogger(__name__)


def previous_run(dest: Destination) -> Manifest | None:
    """The resume record of an interrupted split, else the manifest of a finished one, else None."""
    return load_manifest(dest.source, PARTIAL_MANIFEST_FILE) or load_manifest(
        dest.source, MANIFEST_FILE
    )


def reusable(dest: Destination, old: FileEntry | None, planned: FileEntry) -> FileEntry | None:
    """`old` (the earlier run's entry for the file `planned` describes) if the file on `dest` is
    verified intact and holds what is planned now; None when it must be written again."""
    if old is None or old.tensors != planned.tensors or old.size != planned.size:
        return None
    problem = verify.check_file(dest.source, old)
    if problem:
        logger.info("rewriting %s: %s", planned.name, problem)
        return None
    if not old.header_sha256:  # recorded by an older rabbit-store: take it from the file
        old.header_sha256 = verify.header_digest(*verify.read_head(dest.source, old.name, old.size))
    return old


def load_source_index(source: Source, previous: Manifest | None) -> CheckpointIndex:
    """The source's index; after an interrupted split with delete_original, the recorded layout
    (the deleted shards' layers are finished, the remaining shards are checked by size)."""
    try:
        return CheckpointIndex.load(source)
    except ShardNotFoundError:
        if previous is None or not previous.deleted_shards or not previous.source_index:
            raise
        index = CheckpointIndex.from_dict(source, previous.source_index)
        for file in index.files:
            if file not in previous.deleted_shards and (
                not source.exists(file) or source.size(file) != index.file_sizes[file]
            ):
                raise
        logger.info(
            "resuming: shards %s were deleted by the interrupted split", previous.deleted_shards
        )
        return index
