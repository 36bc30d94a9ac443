"""The split lock on object stores: exclusive create on a real S3 protocol (moto on 127.0.0.1),
waiting, heartbeats, stale takeover, release."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from rabbit_store import split_checkpoint, verify_split
from rabbit_store.constants import SPLIT_LOCK_FILE as LOCK_FILE
from rabbit_store.remote_lock import RemoteLock

from .store_helpers import Checkpoint


def _lock(s3, **kw) -> RemoteLock:
    path = f"{s3['bucket']}/dest/{LOCK_FILE}"
    return RemoteLock(s3["fs"], path, location=f"s3://{s3['bucket']}/dest", **kw)


def _acquire_in_thread(lock: RemoteLock) -> tuple[threading.Thread, threading.Event]:
    got = threading.Event()

    def run():
        lock.acquire()
        got.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def test_second_holder_waits_for_release(s3):
    first = _lock(s3, heartbeat=0.05)
    assert first.acquire() and first.held
    second = _lock(s3, poll=0.05, stale_after=60)
    thread, got = _acquire_in_thread(second)
    assert not got.wait(0.5), "acquired a lock another holder still has"
    first.release()
    assert got.wait(10), "not acquired after the first holder released"
    thread.join()
    holder = json.loads(s3["fs"].cat_file(second.path))
    assert holder["token"] == second.token
    second.release()
    assert not s3["fs"].exists(second.path), "release leaves no lock object"


def test_heartbeats_keep_a_live_lock_from_going_stale(s3):
    first = _lock(s3, heartbeat=0.05)
    first.acquire()
    second = _lock(s3, poll=0.05, stale_after=0.5)
    thread, got = _acquire_in_thread(second)
    assert not got.wait(1.5), "a lock whose holder beats was taken over as stale"
    first.release()
    assert got.wait(10)
    thread.join()
    second.release()


def test_a_killed_holders_lock_is_taken_over(s3, caplog: pytest.LogCaptureFixture):
    s3["fs"].pipe_file(
        f"{s3['bucket']}/dest/{LOCK_FILE}",
        json.dumps({"token": "dead", "host": "gone", "pid": 1, "beat": 1, "time": 0}).encode(),
    )
    lock = _lock(s3, poll=0.05, stale_after=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rabbit_store.remote_lock"):
        assert lock.acquire()
    assert time.monotonic() - started >= 0.3, (
        "taken over before it had been unchanged for stale_after"
    )
    assert "taking over a stale split lock" in caplog.text and "gone" in caplog.text
    assert json.loads(s3["fs"].cat_file(lock.path))["token"] == lock.token
    lock.release()


def test_split_into_s3_waits_for_the_lock_holder(
    s3, sharded: Checkpoint, caplog: pytest.LogCaptureFixture
):
    """While another process holds the destination's lock, a split into it writes nothing; once the
    lock is released it runs to a whole, verified split and leaves no lock object behind."""
    dest = f"s3://{s3['bucket']}/dest"
    holder = _lock(s3, heartbeat=0.05)
    holder.acquire()
    errors: list[BaseException] = []

    def run():
        try:
            split_checkpoint(
                str(sharded.path), dest, dest_storage_options=s3["options"], progress=False
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="rabbit_store.remote_lock"):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(1.5)
        assert thread.is_alive(), "the split did not wait for the lock"
        assert "another split is writing here" in caplog.text
        written = [p for p in s3["fs"].find(f"{s3['bucket']}/dest") if not p.endswith(LOCK_FILE)]
        assert written == [], f"wrote while another split held the lock: {written}"
        holder.release()
        thread.join(120)
    assert not errors, errors
    assert verify_split(dest, storage_options=s3["options"]).ok
    assert not s3["fs"].exists(f"{s3['bucket']}/dest/{LOCK_FILE}")
