"""rabbit_store.verify: the one set of checks used by loading, `verify` and the split's resume."""

from __future__ import annotations

from pathlib import Path

import pytest

import rabbit_store.verify as verify
from rabbit_store import CheckpointIndex, open_source, split_checkpoint, verify_split
from rabbit_store.errors import SplitCorruptedError
from rabbit_store.manifest import FileEntry, load_manifest
from rabbit_store.split import splitter

from .store_helpers import Checkpoint


@pytest.fixture
def split_dir(sharded: Checkpoint, tmp_path: Path) -> Path:
    dest = tmp_path / "split"
    split_checkpoint(str(sharded.path), str(dest), progress=False)
    return dest


def entries(dest: Path):
    manifest = load_manifest(open_source(dest))
    assert manifest is not None
    return {e.name: e for e in manifest.files}


def test_check_file_each_kind_of_damage(split_dir: Path):
    source = open_source(split_dir)
    files = entries(split_dir)
    layer = files["layer-00001.safetensors"]
    assert verify.check_file(source, layer) is None
    path = split_dir / layer.name
    data = path.read_bytes()

    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert verify.check_file(source, layer, check_hash=False) is None
    assert verify.check_file(source, layer).startswith("sha256 ")
    path.write_bytes(data + b"\0")
    assert verify.check_file(source, layer).startswith("size ")
    path.write_bytes(b"\xff" * len(data))
    assert verify.check_file(source, layer).startswith("bad header")
    path.write_bytes(data)
    renamed = FileEntry(**{**vars(layer), "tensors": ["other.weight"]})
    assert verify.check_file(source, renamed).startswith("tensors")
    path.unlink()
    assert verify.check_file(source, layer) == "missing"


def test_header_digest_matches_the_manifest(split_dir: Path):
    source = open_source(split_dir)
    for entry in entries(split_dir).values():
        if entry.tensors:
            head = verify.read_head(source, entry.name, entry.size)
            assert verify.header_digest(*head) == entry.header_sha256


def sabotage(monkeypatch: pytest.MonkeyPatch, check: str) -> list[str]:
    """Make one function of the verify module call every file bad; returns the files it saw."""
    seen: list[str] = []
    if check == "sha256":

        def bad_sha256(source, name):
            seen.append(name)
            return "0" * 64

        monkeypatch.setattr(verify, "file_sha256", bad_sha256)
    else:

        def bad_header(entry, prefix, header):
            seen.append(entry.name)
            return "header differs (sabotaged by the test)"

        monkeypatch.setattr(verify, "header_problem", bad_header)
    return seen


@pytest.mark.parametrize("check", ["sha256", "header"])
def test_loading_checks_through_verify(split_dir: Path, monkeypatch, check: str):
    seen = sabotage(monkeypatch, check)
    with pytest.raises(SplitCorruptedError) as err:
        CheckpointIndex.load(open_source(split_dir), verify_checksums=True)
    assert "layer-00000.safetensors" in err.value.files and set(err.value.files) <= set(seen)
    assert "layer-00000.safetensors" in seen


@pytest.mark.parametrize("check", ["sha256", "header"])
def test_verify_command_checks_through_verify(split_dir: Path, monkeypatch, check: str):
    seen = sabotage(monkeypatch, check)
    problems = verify_split(str(split_dir)).problems
    layers = {n for n in entries(split_dir) if n.startswith("layer-")}
    assert layers <= set(problems) and layers <= set(seen)
    assert all(problems[n].startswith(check) for n in layers)


@pytest.mark.parametrize("check", ["sha256", "header"])
def test_resume_checks_through_verify(
    sharded: Checkpoint, split_dir: Path, monkeypatch, check: str
):
    written: list[str] = []
    real = splitter.Splitter._write_group

    def record(self, name, *args):
        written.append(name)
        return real(self, name, *args)

    monkeypatch.setattr(splitter.Splitter, "_write_group", record)
    split_checkpoint(str(sharded.path), str(split_dir), progress=False)
    assert written == []  # intact: every file reused

    seen = sabotage(monkeypatch, check)
    split_checkpoint(str(sharded.path), str(split_dir), progress=False)
    layers = sorted(n for n in entries(split_dir) if n.startswith("layer-"))
    assert set(layers) <= set(seen) and set(layers) <= set(written)
