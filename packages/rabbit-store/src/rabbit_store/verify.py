"""Checking a split against its manifest: one set of checks for every caller.

A split's manifest records, per file, its size, the sha256 of its length prefix and JSON header, and
the sha256 of the whole file. Three callers check files against it, and all use the functions here,
so that the three can never disagree about what "intact" means:

- loading (`CheckpointIndex.load`): sizes and header digests always (the header bytes are read
  anyway, so this is free), sha256 only with `verify_checksums=True` (it reads every byte);
- `rabbit verify` / `rabbit-store verify` (`verify_split`): every check on every file, a report;
- the splitter's resume: a file from an interrupted run is reused only if `check_file` passes.

Problems are short strings that start with what failed ("missing", "size", "bad header", "header",
"tensors", "sha256"); `corrupted` turns them into the one error loading raises.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .compression import CompressionSchemeError
from .constants import HASH_CHUNK, INDEX_FILE, MANIFEST_FILE, PARTIAL_MANIFEST_FILE
from .errors import HeaderError, ManifestNotFoundError, SplitCorruptedError
from .manifest import FileEntry, Manifest, load_manifest

if TYPE_CHECKING:  # index.py imports this module
    from .index import CheckpointIndex
from .safetensors_header import LENGTH_BYTES, parse_header, parse_length
from .sources import Source


def header_digest(prefix: bytes, header: bytes) -> str:
    """sha256 of a safetensors file's 8-byte length prefix and JSON header, as recorded in
    FileEntry.header_sha256."""
    return hashlib.sha256(bytes(prefix) + bytes(header)).hexdigest()


def file_sha256(source: Source, name: str) -> str:
    """sha256 of a whole file, streamed in HASH_CHUNK pieces (memory stays flat)."""
    digest = hashlib.sha256()
    with source.open(name) as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_heads(
    source: Source, files: list[str], sizes: dict[str, int]
) -> tuple[list[bytes], list[bytes]]:
    """The length prefixes and JSON headers of safetensors files, two batched range reads for all
    of them (concurrent on remote stores); a malformed length is a HeaderError naming the file."""
    prefixes = source.cat_ranges(
        files, [0] * len(files), [min(LENGTH_BYTES, sizes[f]) for f in files]
    )
    ends = [
        LENGTH_BYTES + parse_length(p, file=f"{source.location}/{f}", file_size=sizes[f])
        for f, p in zip(files, prefixes, strict=True)
    ]
    headers = source.cat_ranges(files, [LENGTH_BYTES] * len(files), ends)
    return prefixes, headers


def read_head(source: Source, name: str, size: int) -> tuple[bytes, bytes]:
    """`read_heads` of one file: its length prefix and JSON header."""
    (prefix,), (header,) = read_heads(source, [name], {name: size})
    return prefix, header


def size_problem(entry: FileEntry, size: int) -> str | None:
    if size == entry.size:
        return None
    return f"size {size} != {entry.size} in {MANIFEST_FILE} (truncated or overwritten)"


def header_problem(entry: FileEntry, prefix: bytes, header: bytes) -> str | None:
    """The header digest check; entries of version-1 manifests have none and always pass."""
    if not entry.header_sha256 or header_digest(prefix, header) == entry.header_sha256:
        return None
    return f"header differs from the one recorded in {MANIFEST_FILE}"


def sha256_problem(entry: FileEntry, digest: str) -> str | None:
    if digest == entry.sha256:
        return None
    return f"sha256 {digest} != {entry.sha256} in {MANIFEST_FILE}"


def check_file(source: Source, entry: FileEntry, *, check_hash: bool = True) -> str | None:
    """Why the file `entry` describes does not match it on `source`, or None when it does:
    presence, size, header (tensor names and digest) and, with `check_hash`, sha256."""
    if not source.exists(entry.name):
        return "missing"
    size = source.size(entry.name)
    problem = size_problem(entry, size)
    if problem:
        return problem
    if entry.tensors:
        try:
            prefix, header = read_head(source, entry.name, size)
            tensors, _ = parse_header(header, file=entry.name, file_size=size)
        except HeaderError as exc:
            return f"bad header: {exc}"
        if sorted(tensors) != sorted(entry.tensors):
            return f"tensors in the header differ from {MANIFEST_FILE}"
        problem = header_problem(entry, prefix, header)
        if problem:
            return problem
    if check_hash:
        return sha256_problem(entry, file_sha256(source, entry.name))
    return None


def _entries(manifest: Manifest, files: Sequence[str]) -> list[tuple[str, FileEntry]]:
    return [(f, e) for f in files if (e := manifest.entry(f)) is not None]


def size_problems(manifest: Manifest, sizes: dict[str, int]) -> dict[str, str]:
    """Loading's first check, before any header is parsed (a truncated file would otherwise
    fail as a confusing header error)."""
    found = {f: size_problem(e, sizes[f]) for f, e in _entries(manifest, list(sizes))}
    return {f: p for f, p in found.items() if p}


def header_problems(
    manifest: Manifest, files: Sequence[str], prefixes: Sequence[bytes], headers: Sequence[bytes]
) -> dict[str, str]:
    """Loading's header check, on the prefixes and headers it read for indexing anyway."""
    heads = {f: (p, h) for f, p, h in zip(files, prefixes, headers, strict=True)}
    found = {f: header_problem(e, *heads[f]) for f, e in _entries(manifest, files)}
    return {f: p for f, p in found.items() if p}


def sha256_problems(source: Source, manifest: Manifest, files: Sequence[str]) -> dict[str, str]:
    """Loading's optional checksum pass (verify_checksums=True): every byte read once."""
    found = {f: sha256_problem(e, file_sha256(source, f)) for f, e in _entries(manifest, files)}
    return {f: p for f, p in found.items() if p}


#: How many of the smallest tensors `differing_copies` compares (norms, mostly: a few KB).
COPIES_COMPARED = 8


def differing_copies(original: CheckpointIndex, split: CheckpointIndex) -> list[str]:
    """Names of small tensors the split copied byte for byte whose bytes differ from the
    original's: a split of another checkpoint of the same architecture (a fine-tune) has the same
    names, shapes and dtypes (and so the same layout fingerprint), but other norms.

    Compares the `COPIES_COMPARED` smallest non-empty tensors present in both with the same dtype
    and shape (a few KB read from each side); empty when they all agree.
    """
    common = [
        (info, split.tensors[name])
        for name, info in original.tensors.items()
        if info.nbytes
        and name in split.tensors
        and (split.tensors[name].dtype, split.tensors[name].shape) == (info.dtype, info.shape)
    ]
    common.sort(key=lambda pair: (pair[0].nbytes, pair[0].name))
    common = common[:COPIES_COMPARED]
    if not common:
        return []
    mine = original.source.cat_ranges(
        [a.file for a, _ in common], [a.offset for a, _ in common], [a.end for a, _ in common]
    )
    theirs = split.source.cat_ranges(
        [b.file for _, b in common], [b.offset for _, b in common], [b.end for _, b in common]
    )
    return [
        a.name for (a, _), x, y in zip(common, mine, theirs, strict=True) if bytes(x) != bytes(y)
    ]


def corrupted(location: str, problems: dict[str, str]) -> SplitCorruptedError:
    """The error of a load that found damaged files: each named with its problem, and the fix."""
    listed = "; ".join(f"{location}/{name}: {problem}" for name, problem in problems.items())
    return SplitCorruptedError(
        f"{listed}. The split is corrupted: run `rabbit-store verify {location}` and split "
        "the checkpoint again (a rerun rewrites only the bad files).",
        list(problems),
    )


@dataclass
class VerifyResult:
    """Outcome of verify_split: `problems` maps a file name to what is wrong with it."""

    location: str
    manifest: Manifest = field(repr=False)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_split(
    dest: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    check_hashes: bool = True,
) -> VerifyResult:
    """Check every file of a finished split against its manifest (size, header, sha256).

    Raises ManifestNotFoundError when `dest` holds no rabbit-split.json; returns the problems
    otherwise (an empty `problems` means the split is intact). A `compression` record this
    version cannot read is a problem of rabbit-split.json: the split cannot be loaded.
    """
    from .destination import Destination  # writing machinery: not needed to load a split

    source = Destination(dest, storage_options).source
    bad_record: str | None = None
    try:
        manifest = load_manifest(source, MANIFEST_FILE)
    except CompressionSchemeError as exc:
        # reported like a damaged file (the split cannot be loaded), and the files still checked
        bad_record = str(exc)
        manifest = Manifest.from_json(
            source.read_bytes(MANIFEST_FILE),
            where=f"{source.location}/{MANIFEST_FILE}",
            check_compression=False,
        )
    if manifest is None:
        partial = (
            " (a split into it is unfinished: rerun it)"
            if source.exists(PARTIAL_MANIFEST_FILE)
            else ""
        )
        raise ManifestNotFoundError(
            f"{source.location}: no {MANIFEST_FILE}{partial}; it is not a finished split: run "
            "`rabbit-store split SRC DST` first."
        )
    result = VerifyResult(location=source.location, manifest=manifest)
    if bad_record is not None:
        result.problems[MANIFEST_FILE] = f"compression record: {bad_record}"
    for entry in manifest.files:
        problem = check_file(source, entry, check_hash=check_hashes)
        if problem:
            result.problems[entry.name] = problem
    if not source.exists(INDEX_FILE):
        result.problems[INDEX_FILE] = "missing"
    return result
