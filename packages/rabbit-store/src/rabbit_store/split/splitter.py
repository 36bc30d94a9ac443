"""One split run, start to finish: plan the files, keep the verified ones, write the rest, then
the index and the manifest; and `split_checkpoint`, which sets the run up under the lock."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from .. import verify
from ..compression import CompressionRecord, CompressionSchemeError
from ..constants import INDEX_FILE, MANIFEST_FILE, PARTIAL_MANIFEST_FILE, TENSOR_ALIGNMENT
from ..destination import Destination, write_all
from ..errors import (
    InvalidOptionError,
    RabbitError,
    ShardNotFoundError,
    SplitCorruptedError,
    SplitError,
)
from ..index import CheckpointIndex
from ..manifest import FileEntry, Manifest
from ..plan import LayerPlan
from ..safetensors_header import LENGTH_BYTES, TensorInfo, build_header, tensor_nbytes
from ..sources import FsspecSource, Source, open_source, storage_errors
from .bytecopy import ByteCopier
from .layout import AUX_PATTERNS, file_header, layer_file_name, output_order
from .resume import load_source_index, previous_run, reusable
from .transform import PlannedTensor, SplitTransform

logger = logging.getLogger(__name__)

InFlight = deque[tuple[FileEntry, Future[str] | None]]


class Splitter:
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
        transform: SplitTransform | None = None,
    ) -> None:
        self.source, self.index, self.plan, self.dest = source, index, plan, dest
        self.transform = transform
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
            compression=transform_record(transform),
        )
        # Entries of the previous run not re-checked yet stay in the resume record (they are
        # verified before reuse anyway), so an interruption of this run loses nothing.
        self._carried = {e.name: e for e in previous.files if e.part != "aux"} if previous else {}
        self.copier = ByteCopier(source, dest)

    def _write_group(
        self, name: str, infos: list[TensorInfo], header: bytes, bar: tqdm
    ) -> Future[str]:
        """Write one split file; its sha256 may still be computing when this returns."""
        return self.copier.write_file(name, infos, header, bar)

    def _plan_transformed(
        self, name: str, infos: list[TensorInfo], planned: list[PlannedTensor]
    ) -> tuple[list[TensorInfo], bytes]:
        """The output tensors (consecutive offsets, in the transform's order) and the header of a
        transformed file; a plan that cannot be written is a SplitError naming it."""
        where = f"{self.dest.location}/{name}"
        if not planned:
            raise SplitError(f"{where}: the split transform planned no tensors for this file")
        outputs: list[TensorInfo] = []
        position = 0
        for tensor in planned:
            nbytes = tensor_nbytes(tensor.dtype, tensor.shape)
            if nbytes is None:
                raise SplitError(
                    f"{where}: planned tensor {tensor.name!r} ({tensor.dtype} "
                    f"{list(tensor.shape)}) does not fill whole bytes"
                )
            outputs.append(
                TensorInfo(tensor.name, name, tensor.dtype, tensor.shape, position, nbytes)
            )
            position += nbytes
        names = [t.name for t in outputs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise SplitError(f"{where}: the split transform planned tensor {dup!r} twice")
        fmt = self.index.file_metadata.get(infos[0].file, {}).get("format", "pt")
        # Data from a 64-byte boundary: with the transform's order (sizes that are multiples of
        # 64 first) the tensors the kernels read sit where torch's own allocator would put them.
        return outputs, build_header(outputs, {"format": fmt}, data_start=(TENSOR_ALIGNMENT, 0))

    def _write_transformed(
        self,
        name: str,
        group: tuple[str, int | None, list[TensorInfo]],
        outputs: list[TensorInfo],
        header: bytes,
        bar: tqdm,
    ) -> Future[str]:
        """Write one transformed file atomically from the transform's chunks, checking each
        against the plan (a wrong length leaves no file behind); the bar advances by source
        bytes."""
        assert self.transform is not None
        part, layer, infos = group
        where = f"{self.dest.location}/{name}"
        source_bytes = sum(i.nbytes for i in infos)
        planned_bytes = max(1, sum(o.nbytes for o in outputs))
        digest = hashlib.sha256(header)
        done_bytes = shown = 0
        with self.dest.open_atomic(name) as handle:
            write_all(handle, header)
            chunks = iter(self.transform.produce(part, layer, infos, self.copier.read))
            for tensor in outputs:
                chunk = next(chunks, None)
                if chunk is None:
                    raise SplitError(
                        f"{where}: the split transform produced no data for tensor "
                        f"{tensor.name!r} (planned {tensor.nbytes} bytes)"
                    )
                size = memoryview(chunk).nbytes
                if size != tensor.nbytes:
                    raise SplitError(
                        f"{where}: the split transform produced {size} bytes for tensor "
                        f"{tensor.name!r}, but {tensor.dtype} {list(tensor.shape)} needs "
                        f"{tensor.nbytes}"
                    )
                write_all(handle, chunk)
                digest.update(chunk)
                done_bytes += size
                target = source_bytes * done_bytes // planned_bytes
                bar.update(target - shown)
                shown = target
            if next(chunks, None) is not None:
                raise SplitError(
                    f"{where}: the split transform produced more tensors than the "
                    f"{len(outputs)} it planned"
                )
        bar.update(source_bytes - shown)
        result: Future[str] = Future()
        result.set_result(digest.hexdigest())
        return result

    def _save_progress(self) -> None:
        record = Manifest(
            **{**vars(self.manifest), "files": self.manifest.files + list(self._carried.values())}
        )
        self.dest.write_bytes(PARTIAL_MANIFEST_FILE, record.to_json().encode())

    def _finish(
        self, entry: FileEntry, sha256: Future[str] | None, pending: dict[str, set[str]]
    ) -> None:
        """Record a written (or reused) file in the resume record; delete drained shards."""
        if sha256 is not None:
            entry.sha256 = sha256.result()
            if self.delete_original:
                problem = verify.check_file(self.dest.source, entry)
                if problem:
                    raise SplitCorruptedError(
                        f"{self.dest.location}/{entry.name} failed verification right after "
                        f"writing ({problem}); originals were not deleted: check the destination "
                        "disk.",
                        [entry.name],
                    )
        self.manifest.files.append(entry)
        self._save_progress()
        if self.delete_original:
            self._delete_done_shards(pending, entry.name)

    @contextlib.contextmanager
    def _record_on_failure(self, in_flight: InFlight) -> Iterator[None]:
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
            except (OSError, RabbitError) as exc:  # a full disk may refuse this too: keep the first
                logger.warning("could not record progress in %s: %s", self.dest.location, exc)
            raise

    def _delete_done_shards(self, pending: dict[str, set[str]], written: str) -> None:
        """Delete each source shard whose every output file is written and verified, once."""
        for shard, outputs in pending.items():
            outputs.discard(written)
            if not outputs and shard not in self.deleted:
                logger.info("deleting original shard %s/%s", self.source.location, shard)
                self.copier.release(shard)  # so that the disk space is freed now, not at the end
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
        self._save_progress()  # first: the resume record must outlive rabbit-split.json
        self.dest.remove(MANIFEST_FILE)  # unfinished again until the new one is written
        in_flight: InFlight = deque()
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
                planned = (
                    None
                    if self.transform is None
                    else self.transform.outputs(part, layer, list(infos))
                )
                if planned is None:
                    outputs, header = infos, file_header(self.index, infos)
                else:
                    outputs, header = self._plan_transformed(name, infos, planned)
                entry = FileEntry(
                    name=name,
                    part=part,
                    layer=layer,
                    size=len(header) + sum(o.nbytes for o in outputs),
                    sha256="",
                    tensors=[o.name for o in outputs],
                    header_sha256=verify.header_digest(
                        header[:LENGTH_BYTES], header[LENGTH_BYTES:]
                    ),
                )
                reused = reusable(self.dest, self._carried.pop(name, None), entry)
                if reused is not None:
                    in_flight.append((reused, None))
                    bar.update(sum(i.nbytes for i in infos))
                elif planned is None:
                    in_flight.append((entry, self._write_group(name, infos, header, bar)))
                else:
                    written = self._write_transformed(
                        name, (part, layer, list(infos)), outputs, header, bar
                    )
                    in_flight.append((entry, written))
                # finish files in order; keep at most hash_workers hashes running behind the copy
                while in_flight and (
                    len(in_flight) > self.copier.hash_workers or in_flight[0][1] is None
                ):
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

    def close(self) -> None:
        self.copier.close()


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
    transform: SplitTransform | None = None,
) -> Manifest:
    """Write one safetensors file per layer of `source` into `dest` (any fsspec URL) and return
    the manifest.

    `storage_options` open the source, `dest_storage_options` (default: the same) the destination.
    Reruns skip files already written and verified. `delete_original=True` deletes each source
    shard once every file drawing from it is written and verified. `transform` rewrites the
    tensors of the files it chooses (a compressed split, see split/transform.py); its `record` is
    saved as the manifest's `compression`, and a rerun with another record rewrites every file.
    """
    record = transform_record(transform)  # a bad record is refused before anything is written
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
        try:
            previous = previous_run(dst)
        except CompressionSchemeError as exc:
            logger.warning("%s; rewriting every file", exc)
            previous = None
        index = checked if checked is not None else load_source_index(src, previous)
        if previous is not None and previous.source_fingerprint != index.fingerprint:
            logger.warning(
                "%s holds a split of another checkpoint (%s); overwriting it",
                dst.location,
                previous.source,
            )
            previous = None
        if previous is not None and previous.compression != record:
            logger.warning(
                "%s holds a split written %s; rewriting every file %s",
                dst.location,
                _compression_words(previous.compression),
                _compression_words(record),
            )
            previous = None
        plan = LayerPlan.from_index(index, layer_prefix)
        splitter = Splitter(
            src,
            index,
            plan,
            dst,
            previous,
            progress=progress,
            delete_original=delete_original,
            transform=transform,
        )
        try:
            # an OSError here is the destination's (a full disk) or the source's: one clear
            # StorageError either way; the files written so far stay recorded for a rerun
            with storage_errors(f"splitting {src.location} into {dst.location}"):
                return splitter.run()
        finally:
            splitter.close()


def transform_record(transform: SplitTransform | None) -> dict[str, Any] | None:
    """The manifest's `compression` for a run with `transform`: its record as the JSON the
    manifest will hold (so that a resume compares like with like), checked now so that a record
    the manifest could not be read back with is refused before any file is written."""
    if transform is None:
        return None
    record: dict[str, Any] = json.loads(json.dumps(transform.record))
    CompressionRecord.from_dict(record, where=f"the record of split transform {transform!r}")
    return record


def _compression_words(record: dict[str, Any] | None) -> str:
    """ "without compression" / "with compression 4bit-g32 (int4pack_cpu:AVX512)", for a log."""
    if record is None:
        return "without compression"
    scheme = CompressionRecord.from_dict(record, where=MANIFEST_FILE).scheme
    return f"with compression {scheme.name} ({record['layout']})"
