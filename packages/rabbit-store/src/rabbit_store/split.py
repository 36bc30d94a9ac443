"""Split a checkpoint into one safetensors file per layer, and verify a split.

Byte copy only: each output file is a header we build (same tensor names, dtypes and shapes) plus
the tensors' raw bytes copied from the source, never decoded. Local to local, the bytes move with
`os.copy_file_range` (in the kernel, no user-space copy) while a second thread computes the sha256
from the source's page cache; otherwise large ranged reads (concurrent for remote sources) are
written in big chunks.

The output directory is itself a sharded checkpoint (model.safetensors.index.json + config and
tokenizer files) plus `rabbit-split.json`. Atomic per file, resumable, lock-protected; see
destination.py and manifest.py for the two halves of that.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import mmap
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from .destination import Destination, write_all
from .errors import (
    HeaderError,
    InvalidOptionError,
    ManifestNotFoundError,
    RabbitError,
    ShardNotFoundError,
    SplitCorruptedError,
)
from .index import INDEX_FILE, CheckpointIndex
from .manifest import MANIFEST_FILE, PARTIAL_MANIFEST_FILE, FileEntry, Manifest
from .plan import LayerPlan
from .reader import PART_BYTES
from .safetensors_header import LENGTH_BYTES, TensorInfo, build_header, parse_header, parse_length
from .sources import FsspecSource, Source, open_source, storage_errors

logger = logging.getLogger(__name__)

#: Files copied next to the layers so that the split is a loadable checkpoint (top level only).
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "*processor_config.json",
)
#: Remote reads per batch: this many PART_BYTES ranges are in flight together.
REMOTE_BATCH_PARTS = 8
#: Page size that copied bytes keep their offset modulo (see _Splitter._header).
PAGE = 4096
#: Threads computing sha256 behind the copy. sha256 runs at ~1.5 GB/s per core, slower than a
#: page-cache copy, so files are hashed in parallel (one per core, up to 4) while the kernel copies
#: the next ones: a fast disk is not held back by one core of hashing.
HASH_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Fallback chunk size when copy_file_range is unavailable.
WRITE_CHUNK = 64 * 1024 * 1024


def layer_file_name(part: str, layer: int | None) -> str:
    """File name of one part of the model in a split: `layer-00012.safetensors`, `norm.safetensors`."""
    return f"layer-{layer:05d}.safetensors" if part == "layer" else f"{part}.safetensors"


def output_order(infos: Sequence[TensorInfo]) -> list[TensorInfo]:
    """Widest dtype first (as the safetensors writer does, so every tensor stays aligned),
    checkpoint order within a dtype width (so runs of neighbouring source bytes stay together)."""
    return sorted(infos, key=lambda t: -t.alignment)


def source_runs(infos: Sequence[TensorInfo]) -> list[tuple[str, int, int]]:
    """(file, start, end) source ranges in output order, neighbours that touch merged."""
    runs: list[list[Any]] = []
    for info in infos:
        if runs and runs[-1][0] == info.file and runs[-1][2] == info.offset:
            runs[-1][2] = info.end
        else:
            runs.append([info.file, info.offset, info.end])
    return [(f, s, e) for f, s, e in runs]


@dataclass
class VerifyResult:
    """Outcome of verify_split: `problems` maps a file name to what is wrong with it."""

    location: str
    manifest: Manifest = field(repr=False)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _header_digest(dest: Destination, entry: FileEntry) -> str:
    """sha256 of a written file's length prefix and JSON header."""
    head = dest.read_bytes(entry.name, 0, min(entry.size, LENGTH_BYTES))
    length = parse_length(head, file=entry.name, file_size=entry.size)
    return hashlib.sha256(
        head + dest.read_bytes(entry.name, LENGTH_BYTES, LENGTH_BYTES + length)
    ).hexdigest()


def _check_file(dest: Destination, entry: FileEntry, *, check_hash: bool = True) -> str | None:
    """Why `entry` does not match the file on `dest`, or None when it does."""
    if not dest.exists(entry.name):
        return "missing"
    size = dest.size(entry.name)
    if size != entry.size:
        return f"size {size} != {entry.size} in the manifest"
    if entry.tensors:
        try:
            head = dest.read_bytes(entry.name, 0, min(size, LENGTH_BYTES))
            length = parse_length(head, file=entry.name, file_size=size)
            header = dest.read_bytes(entry.name, LENGTH_BYTES, LENGTH_BYTES + length)
            tensors, _ = parse_header(header, file=entry.name, file_size=size)
        except HeaderError as exc:
            return f"bad header: {exc}"
        if sorted(tensors) != sorted(entry.tensors):
            return "tensors in the header differ from the manifest"
        if entry.header_sha256 and hashlib.sha256(head + header).hexdigest() != entry.header_sha256:
            return "header differs from the one recorded in the manifest"
    if check_hash:
        digest = dest.sha256(entry.name)
        if digest != entry.sha256:
            return f"sha256 {digest} != {entry.sha256} in the manifest"
    return None


def _read_manifest(dest: Destination, name: str) -> Manifest | None:
    if not dest.exists(name):
        return None
    return Manifest.from_json(dest.read_bytes(name), where=f"{dest.location}/{name}")


def verify_split(
    dest: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    check_hashes: bool = True,
) -> VerifyResult:
    """Check every file of a finished split against its manifest (size, header, sha256).

    Raises ManifestNotFoundError when `dest` holds no rabbit-split.json; returns the problems
    otherwise (an empty `problems` means the split is intact).
    """
    target = Destination(dest, storage_options)
    manifest = _read_manifest(target, MANIFEST_FILE)
    if manifest is None:
        partial = (
            " (a split into it is unfinished: rerun it)"
            if target.exists(PARTIAL_MANIFEST_FILE)
            else ""
        )
        raise ManifestNotFoundError(
            f"{target.location}: no {MANIFEST_FILE}{partial}; it is not a finished split: run "
            "`rabbit-store split SRC DST` first."
        )
    result = VerifyResult(location=target.location, manifest=manifest)
    for entry in manifest.files:
        problem = _check_file(target, entry, check_hash=check_hashes)
        if problem:
            result.problems[entry.name] = problem
    if not target.exists(INDEX_FILE):
        result.problems[INDEX_FILE] = "missing"
    return result


class _Splitter:
    """One split run: plan the files, skip the verified ones, write the rest, then the manifest."""

    def __init__(
        self,
        source: Source,
        index: CheckpointIndex,
        plan: LayerPlan,
        dest: Destination,
        previous: Manifest | None,
        *,
        progress: bool,
        delete_original: bool,
    ) -> None:
        self.source, self.index, self.plan, self.dest = source, index, plan, dest
        self.delete_original = delete_original
        self.progress = progress
        self.deleted: list[str] = list(previous.deleted_shards) if previous else []
        self.manifest = Manifest(
            source=source.location,
            source_fingerprint=index.fingerprint,
            layer_prefix=plan.layer_prefix,
            num_layers=plan.num_layers,
            tied=plan.tied,
            deleted_shards=self.deleted,
            source_index=index.to_dict() if delete_original else {},
        )
        # Entries of the previous run not re-checked yet stay in the resume record (they are
        # verified before reuse anyway), so an interruption of this run loses nothing.
        self._carried = {e.name: e for e in previous.files if e.part != "aux"} if previous else {}
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._hasher_pool = ThreadPoolExecutor(
            max_workers=HASH_WORKERS, thread_name_prefix="rabbit-sha256"
        )

    # -- source access -------------------------------------------------------------------------
    def _local(self, file: str) -> tuple[int, mmap.mmap]:
        if file not in self._fds:
            path = self.source.local_path(file)
            assert path is not None
            fd = os.open(path, os.O_RDONLY)
            self._fds[file] = fd
            self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        return self._fds[file], self._maps[file]

    def _all_local(self, runs: Sequence[tuple[str, int, int]]) -> bool:
        # A hub source downloads the shards here, lazily, one file at a time.
        return all(self.source.local_path(f) is not None for f in {r[0] for r in runs})

    def _chunks(self, runs: Sequence[tuple[str, int, int]]) -> Iterator[bytes | memoryview]:
        """The bytes of `runs` in order, in large pieces: mmap slices locally, batched
        concurrent range reads remotely."""
        if self._all_local(runs):
            for file, start, end in runs:
                _, mapped = self._local(file)
                for s in range(start, end, WRITE_CHUNK):
                    yield memoryview(mapped)[s : min(s + WRITE_CHUNK, end)]
            return
        parts = [
            (f, s, min(s + PART_BYTES, e))
            for f, start, e in runs
            for s in range(start, e, PART_BYTES)
        ]
        for i in range(0, len(parts), REMOTE_BATCH_PARTS):
            batch = parts[i : i + REMOTE_BATCH_PARTS]
            yield from self.source.cat_ranges(
                [p[0] for p in batch], [p[1] for p in batch], [p[2] for p in batch]
            )

    # -- writing -------------------------------------------------------------------------------
    def _write_fast(
        self,
        handle: IO[bytes],
        position: int,
        runs: Sequence[tuple[str, int, int]],
        digest: Any,
        bar: tqdm,
    ) -> Future[str]:
        """copy_file_range in the kernel while a hashing thread reads the same source pages.

        Returns the sha256 as a future: the next file's copy starts while this hash finishes.
        """
        views = [memoryview(self._local(f)[1])[s:e] for f, s, e in runs]
        hashing = self._hasher_pool.submit(_hash_views, digest, views)
        out_fd = handle.fileno()
        try:
            for file, start, end in runs:
                _copy_range(self._local(file)[0], out_fd, start, end - start, position)
                position += end - start
                bar.update(end - start)
        except BaseException:
            if hashing.cancel():
                for view in views:
                    view.release()
            else:
                hashing.exception()  # wait: the hash thread releases its views
            raise
        return hashing

    def _write_group(
        self, name: str, infos: list[TensorInfo], header: bytes, bar: tqdm
    ) -> Future[str]:
        """Write one split file; its sha256 may still be computing when this returns."""
        runs = source_runs(infos)
        digest = hashlib.sha256(header)
        with self.dest.open_atomic(name) as handle:
            write_all(handle, header)
            if self.dest.local and self._all_local(runs):
                return self._write_fast(handle, len(header), runs, digest, bar)
            for chunk in self._chunks(runs):
                write_all(handle, chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        done: Future[str] = Future()
        done.set_result(digest.hexdigest())
        return done

    def _header(self, infos: list[TensorInfo]) -> bytes:
        """The split file's header, padded so that the largest source run keeps its page offset."""
        fmt = self.index.file_metadata.get(infos[0].file, {}).get("format", "pt")
        position, best = 0, (-1, 0)  # (run length, source offset - offset within the data section)
        for _, start, end in source_runs(infos):
            best = max(best, (end - start, start - position))
            position += end - start
        return build_header(infos, {"format": fmt}, data_start=(PAGE, best[1] % PAGE))

    def _save_progress(self) -> None:
        record = Manifest(
            **{**vars(self.manifest), "files": self.manifest.files + list(self._carried.values())}
        )
        self.dest.write_bytes(PARTIAL_MANIFEST_FILE, record.to_json().encode())

    def _reuse(self, planned: FileEntry) -> FileEntry | None:
        """The previous run's entry for this file if the file on disk is verified intact."""
        old = self._carried.pop(planned.name, None)
        if old is None or old.tensors != planned.tensors or old.size != planned.size:
            return None
        problem = _check_file(self.dest, old)
        if problem:
            logger.info("rewriting %s: %s", planned.name, problem)
            return None
        if not old.header_sha256:  # recorded by an older rabbit-store: take it from the file
            old.header_sha256 = _header_digest(self.dest, old)
        return old

    def _finish(
        self, entry: FileEntry, sha256: Future[str] | None, pending: dict[str, set[str]]
    ) -> None:
        """Record a written (or reused) file in the resume record; delete drained shards."""
        if sha256 is not None:
            entry.sha256 = sha256.result()
            if self.delete_original:
                problem = _check_file(self.dest, entry)
                if problem:
                    raise SplitCorruptedError(
                        f"{self.dest.location}/{entry.name} failed verification right after writing "
                        f"({problem}); originals were not deleted: check the destination disk.",
                        [entry.name],
                    )
        self.manifest.files.append(entry)
        self._save_progress()
        if self.delete_original:
            self._delete_done_shards(pending, entry.name)

    @contextlib.contextmanager
    def _record_on_failure(
        self, in_flight: deque[tuple[FileEntry, Future[str] | None]]
    ) -> Iterator[None]:
        """If the run fails, still record the files already written whole (their hashes finish),
        so that a rerun does not write them again."""
        try:
            yield
        except BaseException:
            for entry, sha256 in in_flight:
                if sha256 is not None and (sha256.cancelled() or sha256.exception() is not None):
                    break
                if sha256 is not None:
                    entry.sha256 = sha256.result()
                self.manifest.files.append(entry)
            in_flight.clear()
            try:
                self._save_progress()
            except (
                OSError,
                RabbitError,
            ) as exc:  # a full disk may refuse this too: keep the first error
                logger.warning("could not record progress in %s: %s", self.dest.location, exc)
            raise

    def _delete_done_shards(self, pending: dict[str, set[str]], written: str) -> None:
        """Delete each source shard whose every output file is written and verified, once."""
        for shard, outputs in pending.items():
            outputs.discard(written)
            if not outputs and shard not in self.deleted:
                logger.info("deleting original shard %s/%s", self.source.location, shard)
                self._release(shard)  # so that the disk space is freed now, not at the end
                self.source.delete(shard)
                self.deleted.append(shard)
                self._save_progress()

    def run(self) -> Manifest:
        groups = self.plan.groups()
        pending: dict[str, set[str]] = {}
        for part, layer, names in groups:
            for name in names:
                pending.setdefault(self.index.tensors[name].file, set()).add(
                    layer_file_name(part, layer)
                )

        total = sum(self.plan.nbytes(names) for _, _, names in groups)
        self._save_progress()  # before anything else: the resume record must outlive rabbit-split.json
        self.dest.remove(MANIFEST_FILE)  # unfinished again until the new one is written
        in_flight: deque[tuple[FileEntry, Future[str] | None]] = deque()
        with (
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="split",
                disable=not self.progress,
            ) as bar,
            self._record_on_failure(in_flight),
        ):
            for part, layer, names in groups:
                name = layer_file_name(part, layer)
                infos = output_order([self.index.tensors[n] for n in names])
                header = self._header(infos)
                entry = FileEntry(
                    name=name,
                    part=part,
                    layer=layer,
                    size=len(header) + sum(i.nbytes for i in infos),
                    sha256="",
                    tensors=[i.name for i in infos],
                    header_sha256=hashlib.sha256(header).hexdigest(),
                )
                reused = self._reuse(entry)
                if reused is not None:
                    in_flight.append((reused, None))
                    bar.update(entry.size - len(header))
                else:
                    in_flight.append((entry, self._write_group(name, infos, header, bar)))
                # finish files in order; keep at most HASH_WORKERS hashes running behind the copy
                while in_flight and (len(in_flight) > HASH_WORKERS or in_flight[0][1] is None):
                    self._finish(*in_flight.popleft(), pending)
            while in_flight:
                self._finish(*in_flight.popleft(), pending)
        self._copy_aux()
        index = {
            "metadata": {"total_size": self.index.nbytes, "format": "rabbit-split"},
            "weight_map": self.manifest.weight_map(),
        }
        self.dest.write_bytes(INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
        self.manifest.complete = True
        self.dest.write_bytes(MANIFEST_FILE, self.manifest.to_json().encode())
        self.dest.remove(PARTIAL_MANIFEST_FILE)
        return self.manifest

    def _copy_aux(self) -> None:
        """config/tokenizer files, so that the split loads like the original checkpoint."""
        for name in self.source.list_files():
            if "/" in name or not any(fnmatch.fnmatch(name, p) for p in AUX_PATTERNS):
                continue
            data = self.source.read_bytes(name)
            self.dest.write_bytes(name, data)
            self.manifest.files.append(
                FileEntry(
                    name=name, part="aux", size=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
            )

    def _release(self, file: str) -> None:
        if file in self._fds:
            self._maps.pop(file).close()
            os.close(self._fds.pop(file))

    def close(self) -> None:
        self._hasher_pool.shutdown(wait=True)
        for file in list(self._fds):
            self._release(file)


def _hash_views(digest: Any, views: list[memoryview]) -> str:
    """sha256 of the views (hashlib releases the GIL on large buffers), then release them: no
    export may outlive the source map, which _release closes."""
    try:
        for view in views:
            digest.update(view)
        return str(digest.hexdigest())
    finally:
        for view in views:
            view.release()


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, dst_offset: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), else with pread/pwrite."""
    while count > 0:
        try:
            if not hasattr(os, "copy_file_range"):
                raise OSError(errno.ENOSYS, "copy_file_range unavailable")
            done = os.copy_file_range(src_fd, dst_fd, count, offset, dst_offset)
            if done == 0:
                raise OSError(errno.EIO, f"unexpected end of source file at offset {offset}")
        except OSError as exc:
            if exc.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
                errno.ENOTSUP,
            ):
                raise
            data = os.pread(src_fd, min(count, WRITE_CHUNK), offset)
            if not data:
                raise OSError(
                    errno.EIO, f"unexpected end of source file at offset {offset}"
                ) from exc
            done = os.pwrite(dst_fd, data, dst_offset)
        offset += done
        dst_offset += done
        count -= done


def _load_index(source: Source, previous: Manifest | None) -> CheckpointIndex:
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


def split_checkpoint(
    source: str | os.PathLike[str] | Source,
    dest: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    dest_storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    layer_prefix: str | None = None,
    delete_original: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write one safetensors file per layer of `source` into `dest` (any fsspec URL) and return
    the manifest.

    `storage_options` open the source, `dest_storage_options` (default: the same) the destination.
    Reruns skip files already written and verified. `delete_original=True` deletes each source
    shard once every file drawing from it is written and verified.
    """
    src = open_source(
        source, revision=revision, token=token, storage_options=storage_options, cache_dir=cache_dir
    )
    dst = Destination(
        dest, storage_options if dest_storage_options is None else dest_storage_options
    )
    if (
        dst.local
        and isinstance(src, FsspecSource)
        and isinstance(src.fs, LocalFileSystem)
        and os.path.realpath(src.root) == os.path.realpath(dst.root)
    ):
        raise InvalidOptionError(
            f"split destination {dst.location} is the source directory; pass another directory."
        )
    try:
        # validated before the destination is touched: a bad checkpoint leaves nothing behind
        checked: CheckpointIndex | None = CheckpointIndex.load(src)
    except ShardNotFoundError:
        checked = None  # maybe deleted by an interrupted delete_original split: decided below
    dst.makedirs()
    with dst.lock():
        dst.remove_temporaries()
        previous = _read_manifest(dst, PARTIAL_MANIFEST_FILE) or _read_manifest(dst, MANIFEST_FILE)
        index = checked if checked is not None else _load_index(src, previous)
        if previous is not None and previous.source_fingerprint != index.fingerprint:
            logger.warning(
                "%s holds a split of another checkpoint (%s); overwriting it",
                dst.location,
                previous.source,
            )
            previous = None
        plan = LayerPlan.from_index(index, layer_prefix)
        splitter = _Splitter(
            src, index, plan, dst, previous, progress=progress, delete_original=delete_original
        )
        try:
            # an OSError here is the destination's (a full disk) or the source's: one clear
            # StorageError either way; the files written so far stay recorded for a rerun
            with storage_errors(f"splitting {src.location} into {dst.location}"):
                return splitter.run()
        finally:
            splitter.close()


__all__ = ["VerifyResult", "layer_file_name", "split_checkpoint", "verify_split"]
