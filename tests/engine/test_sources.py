"""The engine over every kind of storage, checked against the in-memory model: hub cache (offline),
S3 (a moto server on 127.0.0.1) straight from the shards, and split directories, local and on S3."""

from __future__ import annotations

import huggingface_hub
import torch

from rabbit_store import split_checkpoint
from rabbitllm import AutoModel
from tests.store.store_helpers import make_hub_cache, upload

GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def _same_as_reference(model, ref) -> None:
    ids = torch.randint(3, 200, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert torch.equal(model.generate(ids, **GREEDY), ref.generate(ids, **GREEDY))


def test_hub_repo_offline_from_the_cache(tmp_path, llama_checkpoint, monkeypatch):
    ref, path = llama_checkpoint
    cache = tmp_path / "hub"
    make_hub_cache(cache, "rabbit-org/tiny-llama", path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for location in ("rabbit-org/tiny-llama", "hf://rabbit-org/tiny-llama"):
        with AutoModel.from_pretrained(location, revision=None) as model:
            _same_as_reference(model, ref)


def test_s3_straight_from_the_shards(s3, llama_checkpoint):
    ref, path = llama_checkpoint
    url = f"s3://{s3['bucket']}/tiny-llama"
    upload(s3["fs"], path, url)
    with AutoModel.from_pretrained(url, storage_options=s3["options"]) as model:
        _same_as_reference(model, ref)
        # remote: streamed layers are read into a few pooled buffers, not a fresh one per read
        pool = model._rabbit_streamer.prefetcher.pool
        assert 0 < pool.allocated <= model.streamer_stats["prefetch"] + 1


def test_split_directory_local_and_on_s3(tmp_path, s3, llama_checkpoint):
    ref, path = llama_checkpoint
    local_split = tmp_path / "split"
    split_checkpoint(str(path), str(local_split), progress=False)
    with AutoModel.from_pretrained(path, layers_path=local_split) as model:
        _same_as_reference(model, ref)
    with AutoModel.from_pretrained(
        local_split
    ) as model:  # a split directory is a checkpoint itself
        _same_as_reference(model, ref)
    s3_split = f"s3://{s3['bucket']}/split"
    split_checkpoint(str(path), s3_split, dest_storage_options=s3["options"], progress=False)
    with AutoModel.from_pretrained(s3_split, storage_options=s3["options"]) as model:
        _same_as_reference(model, ref)


def test_memory_filesystem(llama_checkpoint):
    import fsspec

    ref, path = llama_checkpoint
    fs = fsspec.filesystem("memory")
    for file in path.iterdir():
        fs.pipe(f"/tiny-llama/{file.name}", file.read_bytes())
    with AutoModel.from_pretrained("memory:///tiny-llama") as model:
        _same_as_reference(model, ref)
