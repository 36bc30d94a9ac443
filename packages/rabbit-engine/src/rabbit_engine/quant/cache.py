"""`compression=` without a compressed split: compress once into the cache, stream from there.

The cache entry is keyed by the source (its location, its shards' names, sizes and headers, and each
file's version stamp: mtime and inode, ETag, or hub commit) and the scheme, so a changed checkpoint
or another scheme gets its own entry, and a finished entry is used
as it is (its files' sizes and headers are checked at every load, like any split's). Writing it is
`compress_checkpoint`: a progress bar, a lock (a second process waits, then finds it finished) and
resume after an interruption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch
from transformers import PretrainedConfig

from rabbit_engine.dtypes import checkpoint_dtype
from rabbit_engine.errors import InvalidOptionError
from rabbit_engine.quant.writer import compress_checkpoint, scale_dtype_for
from rabbit_store import CheckpointIndex, Source, open_source
from rabbit_store.compression import CompressionScheme
from rabbit_store.constants import MANIFEST_FILE, cache_root
from rabbit_store.manifest import load_manifest

__all__ = ["compressed_cache_dir", "compressed_source"]

logger = logging.getLogger(__name__)


def source_identity(index: CheckpointIndex) -> str:
    """sha256 of where the checkpoint is, its layout (the index fingerprint) and each file's
    version stamp: the layout alone cannot tell two checkpoints of one architecture apart."""
    digest = hashlib.sha256(f"{index.source.location}\0{index.fingerprint}".encode())
    for file in index.files:
        digest.update(f"\0{file}\0{index.source.version(file)}".encode())
    return digest.hexdigest()


def compressed_cache_dir(index: CheckpointIndex, scheme: CompressionScheme) -> Path:
    key = source_identity(index)[:16]
    return cache_root() / "compressed" / f"{key}-{scheme.name}-{scheme.scale_dtype}"


def compressed_source(
    source: Source,
    index: CheckpointIndex,
    compression: CompressionScheme | None,
    *,
    dtype: torch.dtype | None,
    config: PretrainedConfig,
    progress: bool = True,
) -> tuple[Source, CheckpointIndex]:
    """Where the weights stream from: `source` itself when it is a compressed split (its scheme
    must agree with `compression`, if given) or nothing is compressed, else the cache entry for
    `compression` (written now if needed)."""
    record = index.manifest.compression_record() if index.manifest is not None else None
    if record is not None:
        if compression is not None and (compression.bits, compression.group_size) != (
            record.scheme.bits,
            record.scheme.group_size,
        ):
            raise InvalidOptionError(
                f"compression={compression.name!r} was asked for, but "
                f"{source.location}/{MANIFEST_FILE} is a {record.scheme.name} split; drop "
                "compression= to stream it as it is, or point at the original checkpoint.",
                option="compression",
            )
        return source, index
    if compression is None:
        return source, index
    run_dtype = dtype or checkpoint_dtype(index)
    scheme = dataclasses.replace(compression, scale_dtype=scale_dtype_for(run_dtype))
    dest = compressed_cache_dir(index, scheme)
    if not _finished(dest, index, scheme):
        logger.info("compressing %s to %s once, into %s", source.location, scheme.name, dest)
        compress_checkpoint(source, dest, scheme, config=config, progress=progress)
    cached = open_source(dest)
    return cached, CheckpointIndex.load(cached)


def _finished(dest: Path, index: CheckpointIndex, scheme: CompressionScheme) -> bool:
    """A complete cache entry of this source and scheme (checked again, by size and header, when
    it is indexed for loading)."""
    if not dest.is_dir():
        return False
    manifest = load_manifest(open_source(dest))
    if (
        manifest is None
        or not manifest.complete
        or manifest.source_fingerprint != index.fingerprint
    ):
        return False
    record = manifest.compression_record()
    return record is not None and record.scheme == scheme
