"""Moving a split file's bytes and hashing them: the fast path, the portable one, the remote one.

Local to local, the bytes move with `os.copy_file_range` (in the kernel, no user-space copy) while
a pool of threads computes each file's sha256 from the source's page cache; otherwise large ranged
reads (concurrent for remote sources) are written in big chunks and hashed as they pass.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from tqdm.auto import tqdm

from ..destination import Destination, write_all
from ..reader import PART_BYTES
from ..safetensors_header import TensorInfo
from ..sources import Source
from .layout import source_runs

#: Remote reads per batch: this many PART_BYTES ranges are in flight together.
REMOTE_BATCH_PARTS = 8
#: Threads computing sha256 behind the copy. sha256 runs at ~1.5 GB/s per core, slower than a
#: page-cache copy, so files are hashed in parallel (one per core, up to 4) while the kernel copies
#: the next ones: a fast disk is not held back by one core of hashing.
HASH_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Fallback chunk size when copy_file_range is unavailable.
WRITE_CHUNK = 64 * 1024 * 1024
#: copy_file_range errors that mean "not here" (other filesystem, old kernel): use pread/pwrite.
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)

Runs = Sequence[tuple[str, int, int]]


class ByteCopier:
    """Writes split files from one source into one destination; owns the source's open files and
    maps, and the hashing threads. `hash_workers` files may still be hashing behind the copy."""

    def __init__(self, source: Source, dest: Destination) -> None:
        self.source, self.dest = source, dest
        self.hash_workers = HASH_WORKERS  # read now, so that a test may lower it
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=self.hash_workers, thread_name_prefix="rabbit-sha256"
        )

    def _local(self, file: str) -> tuple[int, mmap.mmap]:
        if file not in self._fds:
            path = self.source.local_path(file)
            assert path is not None
            fd = os.open(path, os.O_RDONLY)
            self._fds[file] = fd
            self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        return self._fds[file], self._maps[file]

    def _all_local(self, runs: Runs) -> bool:
        # A hub source downloads the shards here, lazily, one file at a time.
        return all(self.source.local_path(f) is not None for f in {r[0] for r in runs})

    def _chunks(self, runs: Runs) -> Iterator[bytes | memoryview]:
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

    def _write_fast(
        self, handle: IO[bytes], position: int, runs: Runs, digest: Any, bar: tqdm
    ) -> Future[str]:
        """copy_file_range in the kernel while a hashing thread reads the same source pages.

        Returns the sha256 as a future: the next file's copy starts while this hash finishes.
        """
        views = [memoryview(self._local(f)[1])[s:e] for f, s, e in runs]
        hashing = self._pool.submit(hash_views, digest, views)
        out_fd = handle.fileno()
        try:
            for file, start, end in runs:
                copy_range(self._local(file)[0], out_fd, start, end - start, position)
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

    def write_file(
        self, name: str, infos: list[TensorInfo], header: bytes, bar: tqdm
    ) -> Future[str]:
        """Write one split file atomically; its sha256 may still be computing when this returns."""
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

    def read(self, info: TensorInfo) -> memoryview | bytes:
        """One source tensor's raw bytes (for a SplitTransform): a view of the source's map when
        it is local (drop it before the file is released), else one ranged read."""
        if self.source.local_path(info.file) is not None:
            return memoryview(self._local(info.file)[1])[info.offset : info.end]
        (data,) = self.source.cat_ranges([info.file], [info.offset], [info.end])
        return data

    def release(self, file: str) -> None:
        """Close a source file's map (before the file is deleted, so the space is freed now)."""
        if file in self._fds:
            self._maps.pop(file).close()
            os.close(self._fds.pop(file))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for file in list(self._fds):
            self.release(file)


def hash_views(digest: Any, views: list[memoryview]) -> str:
    """sha256 of the views (hashlib releases the GIL on large buffers), then release them: no
    export may outlive the source map, which ByteCopier.release closes."""
    try:
        for view in views:
            digest.update(view)
        return str(digest.hexdigest())
    finally:
        for view in views:
            view.release()


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, dst_offset: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), else with pread/pwrite."""
    while count > 0:
        try:
            if not hasattr(os, "copy_file_range"):
                raise OSError(errno.ENOSYS, "copy_file_range unavailable")
            done = os.copy_file_range(src_fd, dst_fd, count, offset, dst_offset)
            if done == 0:
                raise OSError(errno.EIO, f"unexpected end of source file at offset {offset}")
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
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
