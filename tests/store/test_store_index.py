"""CheckpointIndex: shard names from the index, strict validation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rabbit_store import CheckpointIndex, open_source
from rabbit_store.errors import (
    CheckpointNotFoundError,
    HeaderError,
    IndexFileError,
    ShardNotFoundError,
)

from .store_helpers import Checkpoint, model_tensors, write_checkpoint


def load(path: Path) -> CheckpointIndex:
    return CheckpointIndex.load(open_source(str(path)))


def test_sharded_with_odd_names(sharded: Checkpoint):
    index = load(sharded.path)
    assert index.files == list(sharded.shards)  # taken from the index, in its order
    assert set(index.tensors) == set(sharded.tensors)
    blobs = {f: (sharded.path / f).read_bytes() for f in index.files}
    for name, info in index.tensors.items():
        array = sharded.tensors[name]
        assert blobs[info.file][info.offset : info.end] == array.tobytes()
        assert info.shape == array.shape
    assert index.nbytes == sum(a.nbytes for a in sharded.tensors.values())
    assert len(index.fingerprint) == 64


def test_single_file(single: Checkpoint):
    index = load(single.path)
    assert index.files == ["model.safetensors"]
    assert index.file_metadata["model.safetensors"] == {"format": "pt"}
    assert set(index.tensors) == set(single.tensors)


def test_fingerprint_changes_with_the_checkpoint(tmp_path: Path):
    a = write_checkpoint(tmp_path / "a", model_tensors(seed=1))
    b = write_checkpoint(tmp_path / "b", model_tensors(seed=1))
    tensors = model_tensors(seed=1)
    tensors["model.norm.weight"] = np.zeros(16, dtype=np.float32)  # another shape
    c = write_checkpoint(tmp_path / "c", tensors)
    assert load(a.path).fingerprint == load(b.path).fingerprint != load(c.path).fingerprint


def _write_index(path: Path, weight_map: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "bad",
    [
        "../x.safetensors",
        "/etc/passwd",
        "s3://bucket/x.safetensors",
        "C:\\x.safetensors",
        "a/../../x",
    ],
)
def test_index_entries_escaping_the_model_dir_are_refused(sharded: Checkpoint, bad: str):
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = bad
    _write_index(sharded.path, index["weight_map"])
    with pytest.raises(IndexFileError) as err:
        load(sharded.path)
    assert repr(bad) in str(err.value) and "model.norm.weight" in str(err.value)


def test_missing_shards_are_all_named(sharded: Checkpoint):
    (sharded.path / "part_7.bin.safetensors").unlink()
    (sharded.path / "zz" / "last.safetensors").unlink()
    with pytest.raises(ShardNotFoundError) as err:
        load(sharded.path)
    assert "part_7.bin.safetensors" in str(err.value) and "zz/last.safetensors" in str(err.value)
    assert "Re-download" in str(err.value)


def test_index_and_shard_disagree(sharded: Checkpoint):
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = "weights-a.safetensors"
    _write_index(sharded.path, index["weight_map"])
    with pytest.raises(IndexFileError, match="model.layers.9.ghost.weight"):
        load(sharded.path)


def test_tensor_mapped_to_the_wrong_shard(sharded: Checkpoint):
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "weights-a.safetensors"
    _write_index(sharded.path, index["weight_map"])
    with pytest.raises(IndexFileError, match="model.norm.weight"):
        load(sharded.path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "no 'weight_map'"),
        ("[1]", "no 'weight_map'"),
    ],
)
def test_malformed_index_file(sharded: Checkpoint, content: str, message: str):
    (sharded.path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(IndexFileError, match=message):
        load(sharded.path)


def test_duplicate_weight_map_keys(sharded: Checkpoint):
    (sharded.path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "weights-a.safetensors", "a": "part_7.bin.safetensors"}}'
    )
    with pytest.raises(IndexFileError, match="appears twice"):
        load(sharded.path)


def test_no_checkpoint_explains_what_is_there(tmp_path: Path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError) as err:
        load(tmp_path)
    assert "pytorch_model.bin" in str(err.value) and "only safetensors" in str(err.value)


def test_truncated_shard(single: Checkpoint):
    path = single.path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HeaderError, match="model.safetensors.*truncated"):
        load(single.path)
