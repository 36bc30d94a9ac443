"""CheckpointIndex: every tensor of a safetensors checkpoint and where its bytes are.

Reads `model.safetensors.index.json` (shard names are taken from it, whatever they are; they are
never reconstructed) or a single `model.safetensors`, then only the header bytes of each shard: two
batched range reads for all shards together (length prefixes, then headers), which a remote backend
serves concurrently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from . import verify
from .constants import (
    INDEX_FILE,
    MANIFEST_FILE,
    MAX_INDEX_BYTES,
    NON_SAFETENSORS_WEIGHT_SUFFIXES,
    PARTIAL_MANIFEST_FILE,
    SAFETENSORS_SUFFIX,
    SINGLE_FILE,
)
from .errors import (
    CheckpointNotFoundError,
    IndexFileError,
    InvalidCheckpointError,
    ShardNotFoundError,
)
from .manifest import Manifest, load_manifest
from .safetensors_header import TensorInfo, parse_header
from .sources import Source, relative_name

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "MAX_INDEX_BYTES", "SINGLE_FILE", "CheckpointIndex"]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise IndexFileError(
                f"{INDEX_FILE}: key {key!r} appears twice; the index is ambiguous."
            )
        out[key] = value
    return out


def _read_weight_map(source: Source) -> dict[str, str]:
    """The index's weight_map, with every shard name checked to stay inside the model directory."""
    where = f"{source.location}/{INDEX_FILE}"
    size = source.size(INDEX_FILE)
    if size > MAX_INDEX_BYTES:
        raise IndexFileError(
            f"{where} is {size} bytes, above the {MAX_INDEX_BYTES}-byte cap for an index; it is "
            "not a model index: re-download it."
        )
    try:
        raw = json.loads(source.read_bytes(INDEX_FILE), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IndexFileError(
            f"{where} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); re-download it."
        ) from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexFileError(
            f"{where} has no 'weight_map' object mapping tensor names to shard files; "
            "re-download it."
        )
    checked: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        try:
            checked[tensor] = relative_name(shard, where=f"{where}: weight_map[{tensor!r}]")
        except InvalidCheckpointError as exc:
            raise IndexFileError(f"{exc} Refusing to read it.") from None
    return checked


@dataclass
class CheckpointIndex:
    """All tensors of a checkpoint (checkpoint order: shard order, then data offset)."""

    source: Source
    tensors: dict[str, TensorInfo]
    files: list[str]
    file_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    file_sizes: dict[str, int] = field(default_factory=dict)
    #: sha256 over each shard's name, size and header: changes when any tensor moves or changes
    #: layout; cheap because it needs only what indexing reads anyway.
    fingerprint: str = ""
    #: the split's rabbit-split.json when `source` is a split (it says, e.g., whether and how the
    #: layers are compressed), else None
    manifest: Manifest | None = None

    @classmethod
    def load(cls, source: Source, *, verify_checksums: bool = False) -> CheckpointIndex:
        """Index `source`: sharded (via the index file) or single-file; strict validation.

        A split directory (with rabbit-split.json) has each file's size and header checked against
        the manifest, always; `verify_checksums=True` also reads every file once and checks its
        sha256 (a flipped bit inside tensor data is only found that way). Other checkpoints have no
        checksums to compare with: the option then only logs a warning.
        """
        if source.exists(INDEX_FILE):
            weight_map = _read_weight_map(source)
            files = list(dict.fromkeys(weight_map.values()))
        elif source.exists(SINGLE_FILE):
            weight_map = None
            files = [SINGLE_FILE]
        else:
            raise CheckpointNotFoundError(_no_checkpoint_message(source))

        missing = [f for f in files if not source.exists(f)]
        if missing:
            raise ShardNotFoundError(
                f"{source.location}: {INDEX_FILE} names {len(missing)} shard(s) that are not "
                f"there: {', '.join(missing)}. Re-download the checkpoint (or the missing shards)."
            )

        sizes = {f: source.size(f) for f in files}
        manifest = load_manifest(source, MANIFEST_FILE)
        if manifest is not None:
            _raise_if_any(source, verify.size_problems(manifest, sizes))
        prefixes, headers = verify.read_heads(source, files, sizes)

        if manifest is not None:
            _raise_if_any(source, verify.header_problems(manifest, files, prefixes, headers))
            if verify_checksums:
                _raise_if_any(source, verify.sha256_problems(source, manifest, files))
        elif verify_checksums:
            logger.warning(
                "%s has no %s: nothing to check sha256 against (only splits carry checksums); "
                "sizes and headers were checked",
                source.location,
                MANIFEST_FILE,
            )

        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, dict[str, str]] = {}
        digest = hashlib.sha256()
        for f, header in zip(files, headers, strict=True):
            infos, metadata[f] = parse_header(header, file=f, file_size=sizes[f])
            digest.update(f"{f}\0{sizes[f]}\0".encode() + header)
            for name, info in infos.items():
                if weight_map is not None and weight_map.get(name) != f:
                    if name in weight_map:
                        raise IndexFileError(
                            f"{source.location}: {INDEX_FILE} maps {name!r} to {weight_map[name]} "
                            f"but it is also in {f}; the index and shards disagree: "
                            "re-download them."
                        )
                    logger.warning(
                        "%s: tensor %s in %s is not in %s; ignored",
                        source.location,
                        name,
                        f,
                        INDEX_FILE,
                    )
                    continue
                tensors[name] = info
        if weight_map is not None:
            absent = [name for name in weight_map if name not in tensors]
            if absent:
                shown = ", ".join(f"{n!r} (in {weight_map[n]})" for n in absent[:5])
                more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
                raise IndexFileError(
                    f"{source.location}: {INDEX_FILE} lists tensors that their shards do not "
                    f"contain: {shown}{more}; the index and shards disagree: re-download them."
                )
        return cls(
            source=source,
            tensors=tensors,
            files=files,
            file_metadata=metadata,
            file_sizes=sizes,
            fingerprint=digest.hexdigest(),
            manifest=manifest,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready layout (no data), for a split's resume record."""
        return {
            "files": self.files,
            "file_sizes": self.file_sizes,
            "file_metadata": self.file_metadata,
            "fingerprint": self.fingerprint,
            "tensors": {
                n: [t.file, t.dtype, list(t.shape), t.offset, t.nbytes]
                for n, t in self.tensors.items()
            },
        }

    @classmethod
    def from_dict(cls, source: Source, data: dict[str, Any]) -> CheckpointIndex:
        """Inverse of to_dict: the layout of a checkpoint some of whose shards are gone."""
        tensors = {
            name: TensorInfo(name, file, dtype, tuple(shape), offset, nbytes)
            for name, (file, dtype, shape, offset, nbytes) in data["tensors"].items()
        }
        return cls(
            source=source,
            tensors=tensors,
            files=list(data["files"]),
            file_metadata=dict(data["file_metadata"]),
            file_sizes={k: int(v) for k, v in data["file_sizes"].items()},
            fingerprint=str(data["fingerprint"]),
        )


def _raise_if_any(source: Source, problems: dict[str, str]) -> None:
    if problems:
        raise verify.corrupted(source.location, problems)


def _no_checkpoint_message(source: Source) -> str:
    try:
        present = source.list_files()
    except Exception:  # noqa: BLE001 - only used to word the message better
        present = []
    hint = (
        "pass the directory (or repo) that holds model.safetensors or model.safetensors.index.json"
    )
    if PARTIAL_MANIFEST_FILE in present:
        return (
            f"{source.location}: an unfinished split (it holds {PARTIAL_MANIFEST_FILE}, no "
            f"{INDEX_FILE} yet); rerun `rabbit-store split SRC {source.location}` to finish it."
        )
    other = [f for f in present if f.endswith(NON_SAFETENSORS_WEIGHT_SUFFIXES)]
    if other:
        hint = (
            f"it holds {', '.join(other[:3])}: only safetensors checkpoints are supported; convert "
            "it with transformers (model.save_pretrained(dir, safe_serialization=True))"
        )
    elif any(f.endswith(SAFETENSORS_SUFFIX) for f in present):
        hint = (
            "it holds .safetensors files but no model.safetensors.index.json naming them; add one"
        )
    return f"{source.location}: no {SINGLE_FILE} or {INDEX_FILE}; {hint}."
