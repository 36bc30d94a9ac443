"""Splits that survive SIGKILL, a second process, a full disk and corruption after the fact.

Faults are real: `rabbit-store split` subprocesses are killed with SIGKILL at spread moments (timed
delays, and moments observed on disk: the lock taken, a layer's temporary file, the n-th file in
the resume record, the index written); two processes race for one destination; the destination is
a 20 MB tmpfs; bytes of a finished split are flipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rabbit_store import CheckpointIndex, open_source, split_checkpoint, verify_split
from rabbit_store.errors import SplitCorruptedError, StorageError
from rabbit_store.manifest import MANIFEST_FILE, PARTIAL_MANIFEST_FILE
from tests.store.store_helpers import model_tensors, odd_shards, write_checkpoint

from .conftest import assert_one_line_error, cli_env, digests, finish, start_store_cli, store_cli

NUM_LAYERS = 6


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~76 MB, 6 layers over 3 shards, layer 1 split between the first and the last shard."""
    rng = np.random.default_rng(0)

    def f16(*shape: int) -> np.ndarray:
        return np.frombuffer(rng.bytes(2 * int(np.prod(shape))), dtype=np.float16).reshape(shape)

    tensors = {"model.embed_tokens.weight": f16(4096, 1024)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        tensors.update(
            {
                f"{p}.input_layernorm.weight": rng.standard_normal(1024).astype(np.float32),
                f"{p}.self_attn.q_proj.weight": f16(1024, 1024),
                f"{p}.mlp.up_proj.weight": f16(2048, 1024),
                f"{p}.mlp.down_proj.weight": f16(1024, 2048),
            }
        )
    tensors["model.norm.weight"] = rng.standard_normal(1024).astype(np.float32)
    tensors["lm_head.weight"] = f16(4096, 1024)
    path = tmp_path_factory.mktemp("big") / "model"
    return write_checkpoint(path, tensors, odd_shards(tensors)).path


@pytest.fixture(scope="module")
def reference(big: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], float]:
    """sha256 of every file of an uninterrupted CLI split, and how long its split phase took (from
    the lock file appearing to the manifest appearing: the interpreter's start-up is not part of
    it)."""
    dest = tmp_path_factory.mktemp("reference") / "split"
    proc = start_store_cli("split", str(big), str(dest), "--quiet")
    locked = done = None
    while proc.poll() is None and done is None:
        now = time.monotonic()
        if locked is None and (dest / ".rabbit-split.lock").exists():
            locked = now
        if locked is not None and (dest / MANIFEST_FILE).exists():
            done = now
        time.sleep(0.001)
    result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert locked is not None and done is not None
    return digests(dest), done - locked


def leftovers(dest: Path) -> list[str]:
    return (
        sorted(p.name for p in dest.iterdir() if p.name.endswith(".incomplete"))
        if dest.exists()
        else []
    )


def recorded(dest: Path) -> int:
    try:
        return len(json.loads((dest / PARTIAL_MANIFEST_FILE).read_text())["files"])
    except (OSError, ValueError):
        return -1


def on_disk(dest: Path) -> str:
    """A short description of what a killed split left: for the spread of kill points."""
    if not dest.exists():
        return "nothing"
    names = {p.name for p in dest.iterdir()}
    layers = sum(n.startswith("layer-") and n.endswith(".safetensors") for n in names)
    return (
        f"recorded={recorded(dest)} layers={layers} temps={len(leftovers(dest))} "
        f"index={'model.safetensors.index.json' in names} manifest={MANIFEST_FILE in names}"
    )


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout: float = 60) -> bool:
    """SIGKILL `proc` as soon as `ready()` (polled every ms); False if it exited first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.communicate(timeout=60)
    return proc.returncode == -signal.SIGKILL


def moments(dest: Path, split_time: float) -> Iterator[tuple[str, Callable[[], bool]]]:
    """Kill points: delays after the lock is taken spread over the split, interleaved with states
    seen on disk."""

    def after(fraction: float) -> Callable[[], bool]:
        locked: list[float] = []

        def ready() -> bool:
            if not locked and (dest / ".rabbit-split.lock").exists():
                locked.append(time.monotonic())
            return bool(locked) and time.monotonic() - locked[0] >= fraction * split_time

        return ready

    def temp_of(prefix: str) -> Callable[[], bool]:
        return lambda: any(n.startswith(prefix) for n in leftovers(dest))

    def recorded_at_least(n: int) -> Callable[[], bool]:
        return lambda: recorded(dest) >= n

    yield from [
        ("lock taken", lambda: (dest / ".rabbit-split.lock").exists()),
        ("10% of the split", after(0.1)),
        ("embeddings temp", temp_of(".embeddings")),
        ("25% of the split", after(0.25)),
        ("layer 1 temp", temp_of(".layer-00001")),
        ("40% of the split", after(0.4)),
        ("3 files recorded", recorded_at_least(3)),
        ("55% of the split", after(0.55)),
        ("layer 4 temp", temp_of(".layer-00004")),
        ("70% of the split", after(0.7)),
        ("6 files recorded", recorded_at_least(6)),
        ("85% of the split", after(0.85)),
        ("norm temp", temp_of(".norm")),
        ("index written", lambda: (dest / "model.safetensors.index.json").exists()),
    ]


@pytest.mark.slow
def test_sigkill_at_spread_moments_then_rerun_is_byte_identical(
    big: Path, reference, tmp_path: Path
):
    expected, split_time = reference
    killed: dict[str, str] = {}
    for i, (moment, ready) in enumerate(moments(tmp_path / "d", split_time)):
        dest = tmp_path / "d"
        if dest.exists():
            os.rename(dest, tmp_path / f"done-{i}")  # keep `moments` looking at "d"
        proc = start_store_cli("split", str(big), str(dest), "--quiet")
        if kill_when(proc, ready) and not (dest / MANIFEST_FILE).exists():
            killed[moment] = on_disk(dest)  # (a kill after the manifest interrupted nothing)
        if i % 3 == 1:  # kill the resume too, half way through a fresh run's time
            again = start_store_cli("split", str(big), str(dest), "--quiet")
            kill_when(
                again,
                next(m for name, m in moments(dest, split_time) if name == "25% of the split"),
            )
        split_checkpoint(big, dest, progress=False)  # the rerun completes...
        assert digests(dest) == expected, moment  # ...byte-identical, manifest and index included
        assert leftovers(dest) == [] and not (dest / PARTIAL_MANIFEST_FILE).exists()
        for old in tmp_path.glob("done-*"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    assert len(killed) >= 10, killed
    assert len(set(killed.values())) >= 5, killed  # the kills landed in different states


RACER = """
import glob, sys, time
import rabbit_store.split  # imported before the start signal: both are ready to split
from rabbit_store.cli import main
while not glob.glob(sys.argv[1]):
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_split_into_one_destination(big: Path, reference, tmp_path: Path):
    """Two `rabbit-store split` processes into one directory. The second starts splitting the
    moment the first is seen writing a file (so the first holds the lock): it waits for the lock,
    then finds the work done. Both succeed; the result is the uninterrupted split."""
    expected, _ = reference
    for attempt in range(
        3
    ):  # a loaded machine may stall the second past the first's end: race again
        dest = tmp_path / f"dest-{attempt}"
        args = ["--debug", "split", str(big), str(dest), "--quiet"]
        signals = [str(tmp_path / f"go-{attempt}"), str(dest / ".*.incomplete")]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, signal_, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cli_env(),
            )
            for signal_ in signals
        ]
        time.sleep(0.5)
        Path(signals[0]).touch()
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
        assert digests(dest) == expected
        assert verify_split(dest).ok and leftovers(dest) == []
        if re.search(r"Lock \d+ not acquired on .*\.rabbit-split\.lock", results[1][1]):
            break
    else:
        pytest.fail("the second process never had to wait for the lock")
    assert "not acquired" not in results[0][1]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); see the RLIMIT_FSIZE test")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_clear_error_and_leaves_no_temporaries(
    big: Path, reference, small_tmpfs: Path
):
    dest = small_tmpfs / "split"
    with pytest.raises(StorageError) as err:
        split_checkpoint(big, dest, progress=False)
    message = str(err.value)
    assert str(dest) in message and "no space left" in message and "free some space" in message
    assert leftovers(dest) == [] and not (dest / MANIFEST_FILE).exists()
    written_before = recorded(dest)
    assert written_before >= 1  # what fitted is recorded for the rerun

    result = store_cli("split", str(big), str(dest), "--quiet")  # the CLI: one line, exit 2
    assert_one_line_error(result, str(dest), "no space left")
    assert leftovers(dest) == [] and not (dest / MANIFEST_FILE).exists()

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_tmpfs)], check=True)
    split_checkpoint(big, dest, progress=False)  # space freed: the rerun finishes the job
    assert digests(dest) == reference[0]


def test_file_size_limit_is_a_clear_error(big: Path, tmp_path: Path):
    """The same without mount rights: RLIMIT_FSIZE makes writes past 8 MB fail with EFBIG."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    dest = tmp_path / "dest"
    done = subprocess.run(
        [sys.executable, "-m", "rabbit_store.cli", "split", str(big), str(dest), "--quiet"],
        capture_output=True,
        text=True,
        env=cli_env(),
        preexec_fn=limit,
        timeout=120,
    )
    assert_one_line_error(done, str(dest), "no space left", "File too large")
    assert leftovers(dest) == [] and not (dest / MANIFEST_FILE).exists()


# ---- corruption after the split ------------------------------------------------------------------
@pytest.fixture
def small_split(tmp_path: Path) -> Path:
    tensors = model_tensors(num_layers=4)
    source = write_checkpoint(tmp_path / "src", tensors, odd_shards(tensors)).path
    split_checkpoint(source, tmp_path / "split", progress=False)
    return tmp_path / "split"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_data_byte_found_by_verify_and_by_checksums(small_split: Path):
    flip(small_split / "layer-00002.safetensors", -1)
    result = store_cli("verify", str(small_split))
    assert result.returncode == 1
    assert (
        "CORRUPTED layer-00002.safetensors: sha256" in result.stderr
        and "layer-00001" not in result.stderr
    )
    CheckpointIndex.load(open_source(small_split))  # sizes and headers intact: only sha256 can tell
    with pytest.raises(SplitCorruptedError) as err:
        CheckpointIndex.load(open_source(small_split), verify_checksums=True)
    assert err.value.files == [
        "layer-00002.safetensors"
    ] and "layer-00002.safetensors: sha256" in str(err.value)


@pytest.mark.parametrize(
    "damage", ["header JSON", "header metadata", "length prefix", "truncated", "grown"]
)
def test_damaged_header_or_size_refused_at_every_load(small_split: Path, damage: str):
    victim = small_split / "layer-00001.safetensors"
    data = victim.read_bytes()
    if damage == "header JSON":
        flip(victim, 8)  # '{' -> 'z'
    elif damage == "header metadata":
        flip(
            victim, data.index(b'"pt"') + 2
        )  # still valid JSON, same tensors: only the digest knows
    elif damage == "length prefix":
        flip(victim, 0)
    elif damage == "truncated":
        victim.write_bytes(data[:-7])
    else:
        victim.write_bytes(data + b"\0")
    with pytest.raises(SplitCorruptedError, match="layer-00001.safetensors") as err:
        CheckpointIndex.load(open_source(small_split))
    assert err.value.files == ["layer-00001.safetensors"] and "split the checkpoint again" in str(
        err.value
    )
    assert_one_line_error(
        store_cli("inspect", str(small_split)), "layer-00001.safetensors", "corrupted"
    )
    checked = store_cli("verify", str(small_split), "--no-hash")
    assert checked.returncode == 1 and "CORRUPTED layer-00001.safetensors" in checked.stderr


def test_manifest_checksums_that_do_not_match_the_files(small_split: Path):
    manifest = json.loads((small_split / MANIFEST_FILE).read_text())
    entry = next(f for f in manifest["files"] if f["name"] == "norm.safetensors")
    entry["sha256"] = "0" * 64
    (small_split / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = store_cli("verify", str(small_split))
    assert result.returncode == 1 and "CORRUPTED norm.safetensors: sha256" in result.stderr
    with pytest.raises(SplitCorruptedError, match="norm.safetensors"):
        CheckpointIndex.load(open_source(small_split), verify_checksums=True)
