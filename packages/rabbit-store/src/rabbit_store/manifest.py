"""rabbit-split.json: what a split directory holds, so that it can be verified and resumed.

The same structure is saved as `rabbit-split.partial.json` after every finished file while a split
runs (the resume record: a file is trusted only once it is listed there with its size and sha256)
and as `rabbit-split.json`, written last, when the split is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .compression import CompressionRecord
from .constants import MANIFEST_FILE, PARTIAL_MANIFEST_FILE
from .errors import SplitError

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "PARTIAL_MANIFEST_FILE",
    "PARTS",
    "VERSION",
    "FileEntry",
    "Manifest",
    "load_manifest",
]
FORMAT = "rabbit-split"
#: 2 added FileEntry.header_sha256. Version 1 manifests still load (their entries have no header
#: digest, so only sizes are checked at load); a rabbit-store that only knows 1 refuses version 2
#: with "newer rabbit-store?" rather than failing on an unknown field. 3 added `compression`
#: (compressed splits): a rabbit-store that only knows 2 refuses them by version instead of
#: loading packed tensors as if they were the checkpoint's; 1 and 2 manifests load as plain splits.
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

#: Parts of a model that get their own safetensors file ("aux": config/tokenizer copies).
PARTS = ("embeddings", "layer", "norm", "lm_head", "other", "aux")


@dataclass
class FileEntry:
    """One file of a split: its part of the model, size, sha256 and (safetensors) tensor names.

    `header_sha256` (sha256 of the 8-byte length and the JSON header) lets every load check a
    layer file's header against the manifest for the price of the header read it does anyway;
    "" in manifests written before it existed.
    """

    name: str
    part: str
    size: int
    sha256: str
    layer: int | None = None
    tensors: list[str] = field(default_factory=list)
    header_sha256: str = ""


@dataclass
class Manifest:
    source: str
    source_fingerprint: str
    layer_prefix: str
    num_layers: int
    tied: bool
    files: list[FileEntry] = field(default_factory=list)
    complete: bool = False
    #: shards of the source removed by delete_original (so that a resume knows why they are gone)
    deleted_shards: list[str] = field(default_factory=list)
    #: the source's tensor layout, kept so that a resume after delete_original can plan without
    #: the deleted shards (see split.resume.load_source_index)
    source_index: dict[str, Any] = field(default_factory=dict)
    #: None for a plain split; else CompressionRecord.to_dict() (the scheme, the packed layout and
    #: every compressed tensor): validated whenever the manifest is read, so a split written with
    #: an unknown scheme is refused by name before any layer is loaded
    compression: dict[str, Any] | None = None
    format: str = FORMAT
    version: int = VERSION

    def entry(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)

    @property
    def layers(self) -> list[str]:
        """File name of each decoder layer, by layer index."""
        by_index = {f.layer: f.name for f in self.files if f.part == "layer"}
        return [by_index[i] for i in sorted(by_index)]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def weight_map(self) -> dict[str, str]:
        return {t: f.name for f in self.files for t in f.tensors}

    def compression_record(self) -> CompressionRecord | None:
        """The compression this split was written with, or None for a plain split."""
        if self.compression is None:
            return None
        return CompressionRecord.from_dict(self.compression, where=MANIFEST_FILE)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(
        cls, text: str | bytes, *, where: str, check_compression: bool = True
    ) -> Manifest:
        """Parse a manifest; anything malformed is a SplitError naming `where`, a `compression`
        this version cannot read a CompressionSchemeError naming `where` and the field
        (`check_compression=False` skips that check: verify reports it and still checks files)."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, not {FORMAT!r}")
            if raw.get("version") not in READABLE_VERSIONS:
                raise ValueError(
                    f"version {raw.get('version')!r} is not one of {READABLE_VERSIONS} "
                    "(newer rabbit-store?)"
                )
            files = [FileEntry(**entry) for entry in raw.pop("files")]
            if raw["version"] == 1 and any(f.header_sha256 for f in files):
                raise ValueError("version 1 manifests have no header_sha256")
            if raw["version"] < 3 and raw.get("compression") is not None:
                raise ValueError(f"version {raw['version']} manifests have no compression")
            raw["version"] = VERSION  # rewritten as the current version whenever it is saved again
            manifest = cls(files=files, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SplitError(
                f"{where} is not a valid rabbit-split manifest ({exc}); split the checkpoint again."
            ) from None
        if check_compression and manifest.compression is not None:
            CompressionRecord.from_dict(manifest.compression, where=where)
        return manifest


class _Files(Protocol):
    """What load_manifest needs of a location (a Source has it)."""

    location: str

    def exists(self, name: str) -> bool: ...

    def read_bytes(self, name: str) -> bytes: ...


def load_manifest(files: _Files, name: str = MANIFEST_FILE) -> Manifest | None:
    """The manifest `name` (MANIFEST_FILE or PARTIAL_MANIFEST_FILE) at a location, or None when
    there is none; a malformed one is a SplitError naming it."""
    if not files.exists(name):
        return None
    return Manifest.from_json(files.read_bytes(name), where=f"{files.location}/{name}")
