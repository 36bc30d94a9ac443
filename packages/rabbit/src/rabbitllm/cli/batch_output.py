"""`rabbit batch`'s output file: whole lines only, resumable, in input order at the end.

Each finished row is appended with one write() and an fsync, so a killed run loses only the
requests in flight; at open, a half line left by a crash is truncated away, error rows are dropped
(their lines run again) and the ids already there are done. Requests finish out of order, so the
file is rewritten in input order at the end (a temporary file renamed over it). Holding finished
rows back until earlier ones are done would keep it in order throughout, but one long request at
the front would then hold every later result in memory, and a kill would lose them all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rabbitllm.cli.errors import UsageError

logger = logging.getLogger(__name__)


def encode_row(row: dict[str, Any]) -> bytes:
    """One output line; ensure_ascii keeps it one line whatever the text holds."""
    return (json.dumps(row, ensure_ascii=True) + "\n").encode()


class OutputFile:
    """OUT.jsonl, written so that a kill at any moment leaves only whole lines.

    Rows are appended (O_APPEND) with one write() per group of rows and an fsync after it. At open,
    what an earlier run left is read back: a last line without its newline (a write cut short) is
    truncated away, error rows are dropped so that their lines are tried again, and the rest are
    the ids already done.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, bytes] = {}  # id -> its line, for the final rewrite
        self.dropped_partial = 0  # bytes of a half line found at open
        self.dropped_errors = 0
        self._fd: int | None = None

    def open(self, input_ids: Iterable[str]) -> None:
        """Read what OUT holds (if anything), repair it, and open it for appending."""
        wanted = set(input_ids)
        raw = self._read_existing()
        end = raw.rfind(b"\n") + 1  # 0 when there is no complete line
        self.dropped_partial = len(raw) - end
        keep: list[bytes] = []
        first_line: dict[str, int] = {}
        for number, line in enumerate(raw[:end].splitlines(keepends=True), start=1):
            if not line.strip():
                continue
            request_id, is_error = self._parse_row(line, number)
            if is_error:
                self.dropped_errors += 1
                continue
            if request_id in first_line:
                raise UsageError(
                    f"{self.path}: id {request_id!r} is on line {first_line[request_id]} and "
                    f"on line {number}; remove one of them"
                )
            if request_id not in wanted:
                raise UsageError(
                    f"{self.path}, line {number}: id {request_id!r} is not in the input; is this "
                    "the output of another input file? Write to a new file (-o), or remove that "
                    "line"
                )
            first_line[request_id] = number
            self.rows[request_id] = line
            keep.append(line)
        if self.dropped_errors:
            self._replace(keep)  # also drops a half line
        elif self.dropped_partial:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        if self.dropped_partial:
            logger.warning(
                "%s ended in a half-written line (%d bytes, from a run that was killed); "
                "dropped it",
                self.path,
                self.dropped_partial,
            )
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read_existing(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def _parse_row(self, line: bytes, number: int) -> tuple[str, bool]:
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise UsageError(
                f"{self.path}, line {number}: not a row written by rabbit batch (a JSON object "
                "with an id); write to a new file (-o), or fix that line"
            )
        return row["id"], "error" in row

    @property
    def done(self) -> set[str]:
        return set(self.rows)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write `rows` with one write() and make them durable before returning."""
        if not rows:
            return
        if self._fd is None:
            raise RuntimeError("OutputFile.append before open")
        lines = [encode_row(row) for row in rows]
        data = memoryview(b"".join(lines))
        while data:  # write() may write less than asked (a signal, a full disk): finish the rest
            written = os.write(self._fd, data)
            data = data[written:]
        os.fsync(self._fd)
        for row, line in zip(rows, lines, strict=True):
            self.rows[row["id"]] = line

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self, order: list[str]) -> bool:
        """Rewrite OUT with its rows in `order` (the input's ids; those not done yet are left
        out); False when it was in order already."""
        self.close()
        current = self._read_existing()
        ordered = [self.rows[i] for i in order if i in self.rows]
        if b"".join(ordered) == current:
            return False
        self._replace(ordered)
        return True

    def _replace(self, lines: list[bytes]) -> None:
        """OUT becomes exactly `lines`, atomically: a temporary file beside it, renamed over it."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(self.path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """One `rabbit batch` per OUT: two appending to the same file would each redo the other's
    requests and leave duplicates."""
    from filelock import FileLock, Timeout

    lock_path = path.with_name(path.name + ".lock")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(
            f"another rabbit batch is writing {path} (it holds {lock_path}); wait for it to end"
        ) from None
    try:
        yield
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            lock_path.unlink()


# ---- running -------------------------------------------------------------------------------------
