"""S3 for real: a moto server, s3fs pointed at it through storage_options."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbit_store import (
    CheckpointIndex,
    LayerPlan,
    LayerReader,
    open_source,
    split_checkpoint,
    verify_split,
)
from rabbit_store.errors import CheckpointNotFoundError

from .store_helpers import Checkpoint, upload


def read_layers(location: str, **options) -> tuple[LayerPlan, dict[str, bytes]]:
    source = open_source(location, **options)
    index = CheckpointIndex.load(source)
    plan = LayerPlan.from_index(index)
    with LayerReader(source, index) as reader:
        out: dict[str, bytes] = {}
        for names in [plan.embeddings, *plan.layers, plan.norm, plan.lm_head]:
            out.update({n: bytes(v) for n, v in reader.read(names).items()})
    return plan, out


def expected(checkpoint: Checkpoint) -> dict[str, bytes]:
    return {n: a.tobytes() for n, a in checkpoint.tensors.items()}


def test_read_layers_straight_from_s3_shards(s3, sharded: Checkpoint):
    url = f"s3://{s3['bucket']}/models/tiny"
    upload(s3["fs"], sharded.path, url)
    source = open_source(url, storage_options=s3["options"])
    assert source.local_path("weights-a.safetensors") is None
    assert "testing" not in source.location
    plan, got = read_layers(url, storage_options=s3["options"])
    assert plan.num_layers == 4 and got == expected(sharded)


def test_split_local_to_s3_and_read_back(s3, sharded: Checkpoint):
    url = f"s3://{s3['bucket']}/split/tiny"
    manifest = split_checkpoint(
        str(sharded.path), url, storage_options=s3["options"], progress=False
    )
    assert manifest.num_layers == 4
    assert s3["fs"].exists(f"{url}/rabbit-split.json") and s3["fs"].exists(f"{url}/config.json")
    assert verify_split(url, storage_options=s3["options"]).ok
    plan, got = read_layers(url, storage_options=s3["options"])
    assert got == expected(sharded)
    assert all(len(names) == len(set(names)) for names in plan.layers)
    # a rerun verifies and skips everything
    again = split_checkpoint(str(sharded.path), url, storage_options=s3["options"], progress=False)
    assert [f.sha256 for f in again.files] == [f.sha256 for f in manifest.files]


def test_split_s3_to_local(s3, sharded: Checkpoint, tmp_path: Path):
    url = f"s3://{s3['bucket']}/src"
    upload(s3["fs"], sharded.path, url)
    split_checkpoint(url, tmp_path / "out", storage_options=s3["options"], progress=False)
    assert verify_split(tmp_path / "out").ok
    _, got = read_layers(str(tmp_path / "out"))
    assert got == expected(sharded)


def test_local_cache_serves_the_second_read(
    s3, sharded: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = f"s3://{s3['bucket']}/cached"
    upload(s3["fs"], sharded.path, url)
    cache = tmp_path / "blocks"
    source = open_source(url, storage_options=s3["options"], local_cache=str(cache))
    index = CheckpointIndex.load(source)
    plan = LayerPlan.from_index(index)
    reader = LayerReader(source, index)
    first = {n: bytes(v) for n, v in reader.read(plan.layers[1]).items()}
    assert any(cache.iterdir())  # blocks on local disk

    import s3fs

    def no_network(*args, **kwargs):
        raise AssertionError("second read went to S3")

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", no_network)
    second = {n: bytes(v) for n, v in reader.read(plan.layers[1]).items()}
    assert first == second == {n: sharded.tensors[n].tobytes() for n in plan.layers[1]}


def test_local_cache_true_lives_under_rabbitllm_cache(
    s3, sharded: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = f"s3://{s3['bucket']}/cached-default"
    upload(s3["fs"], sharded.path, url)
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "rabbit-cache"))
    source = open_source(url, storage_options=s3["options"], local_cache=True)
    index = CheckpointIndex.load(source)
    LayerReader(source, index).read(LayerPlan.from_index(index).layers[0])
    assert any((tmp_path / "rabbit-cache" / "remote").iterdir())


def test_missing_prefix(s3):
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        open_source(f"s3://{s3['bucket']}/nothing/here", storage_options=s3["options"])
