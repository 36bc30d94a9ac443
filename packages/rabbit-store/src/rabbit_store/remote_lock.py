"""A lock for split destinations on object stores, where `filelock` cannot go.

Two splits writing into one S3 prefix at once would interleave their resume records and files.
Neither fsspec nor the stores offer a lock, but S3 (and fsspec's memory filesystem) honour an
exclusive create: `open(path, "xb")` is a conditional PUT (`If-None-Match: *`) that fails with
FileExistsError when the object exists. On that primitive:

- acquire = create the lock object exclusively; while another holder's object exists, wait;
- the holder rewrites its object every `heartbeat` seconds, so a live lock keeps changing;
- a lock whose content has not changed for `stale_after` seconds *of our own waiting* (measured
  with our monotonic clock, so clock skew between hosts and the store does not matter) belongs to
  a split that was killed: it is deleted (with a warning) and the create retried;
- release = delete the object, if it is still ours.

Filesystems without exclusive create (the mode is refused) get no lock, as before, with a log line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
POLL_S = 2.0


class RemoteLock:
    """Context manager; one acquisition per instance."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        *,
        location: str,
        heartbeat: float = HEARTBEAT_S,
        stale_after: float = STALE_AFTER_S,
        poll: float = POLL_S,
    ) -> None:
        self.fs, self.path, self.location = fs, path, location
        self.heartbeat, self.stale_after, self.poll = heartbeat, stale_after, poll
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._count = 0

    def _body(self) -> bytes:
        self._count += 1
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "beat": self._count,
                "time": time.time(),
            }
        ).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable (a partial object cannot exist on S3, but be safe)
            return {}

    def acquire(self) -> bool:
        """True once held; False when the filesystem cannot create exclusively (no lock)."""
        seen: tuple[str, float] | None = None  # (content seen, monotonic time it was first seen)
        told = False
        while True:
            try:
                with self.fs.open(self.path, "xb") as handle:
                    handle.write(self._body())
                break
            except FileExistsError:
                pass
            except (ValueError, NotImplementedError, TypeError) as exc:  # mode "x" not supported
                logger.info(
                    "%s: no exclusive create (%s): no lock; do not run two splits into it at once",
                    self.location,
                    exc,
                )
                return False
            holder = self._holder()
            if holder is None:
                continue  # released between our create and our read: try again at once
            content = json.dumps(holder, sort_keys=True)
            now = time.monotonic()
            if seen is None or seen[0] != content:
                seen = (content, now)
            elif now - seen[1] >= self.stale_after:
                logger.warning(
                    "%s: taking over a stale split lock (unchanged for %.0f s; written by %s "
                    "pid %s)",
                    self.location,
                    now - seen[1],
                    holder.get("host"),
                    holder.get("pid"),
                )
                try:
                    self.fs.rm_file(self.path)
                except FileNotFoundError:
                    pass
                seen = None
                continue
            if not told:
                logger.info(
                    "%s: another split is writing here (host %s pid %s); waiting for it",
                    self.location,
                    holder.get("host"),
                    holder.get("pid"),
                )
                told = True
            time.sleep(self.poll)
        self.held = True
        self._beat = threading.Thread(
            target=self._keep_alive, name="rabbit-split-lock", daemon=True
        )
        self._beat.start()
        return True

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = self._holder()
            if not holder or holder.get("token") != self.token:
                logger.warning(
                    "%s: the split lock was taken over by another process", self.location
                )
                return
            try:
                self.fs.pipe_file(self.path, self._body())
            except OSError as exc:  # a transient store error: the next beat tries again
                logger.debug("lock heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.held:
            holder = self._holder()
            if holder and holder.get("token") == self.token:
                try:
                    self.fs.rm_file(self.path)
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> RemoteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
