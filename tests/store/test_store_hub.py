"""Hub repos: offline from a hub cache laid out on disk; online with huggingface_hub's network
calls replaced by local fakes (lazy per-file downloads into the cache)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from rabbit_store import CheckpointIndex, LayerPlan, LayerReader, open_source, split_checkpoint
from rabbit_store.errors import CheckpointNotFoundError, InvalidOptionError, ShardNotFoundError
from rabbit_store.sources.hub import HubCacheSource, HubSource

from .store_helpers import COMMIT, Checkpoint, make_hub_cache, sha256_file, tensors_of

REPO = "rabbit-org/tiny-model"


@pytest.fixture
def hub_cache(tmp_path: Path, sharded: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    make_hub_cache(cache, REPO, sharded.path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "location", [REPO, f"hf://{REPO}", f"hf://{REPO}@main", f"hf://{REPO}@{COMMIT}"]
)
def test_offline_from_the_hub_cache(
    hub_cache: Path, offline: None, sharded: Checkpoint, location: str
):
    source = open_source(location)
    assert isinstance(source, HubCacheSource)
    assert source.location == f"hf://{REPO}@{COMMIT}"
    local = source.local_path("zz/last.safetensors")
    assert local is not None and os.path.islink(local) and str(hub_cache) in os.path.realpath(local)
    index = CheckpointIndex.load(source)
    plan = LayerPlan.from_index(index)
    views = LayerReader(source, index).read(plan.layers[1])
    assert {n: bytes(v) for n, v in views.items()} == {
        n: sharded.tensors[n].tobytes() for n in views
    }


def test_offline_explicit_revision_and_cache_dir(
    tmp_path: Path, sharded: Checkpoint, offline: None
):
    cache = tmp_path / "other-cache"
    make_hub_cache(cache, REPO, sharded.path, ref="v1.0")
    source = open_source(REPO, revision="v1.0", cache_dir=str(cache))
    assert source.location.endswith(COMMIT)
    with pytest.raises(CheckpointNotFoundError, match="not in the hub cache"):
        open_source(REPO, revision="v2.0", cache_dir=str(cache))
    with pytest.raises(InvalidOptionError, match="give one of them"):
        open_source(f"hf://{REPO}@v1.0", revision="main", cache_dir=str(cache))


def test_offline_missing_repo_says_what_to_do(hub_cache: Path, offline: None):
    with pytest.raises(CheckpointNotFoundError) as err:
        open_source("rabbit-org/absent")
    assert "HF_HUB_OFFLINE" in str(err.value) and "hf download rabbit-org/absent" in str(err.value)


def test_offline_missing_shard_is_named(hub_cache: Path, offline: None):
    os.remove(next(hub_cache.rglob("snapshots/*/part_7.bin.safetensors")))
    with pytest.raises(ShardNotFoundError, match="part_7.bin.safetensors"):
        CheckpointIndex.load(open_source(REPO))


def test_incomplete_cached_snapshot_is_still_used(
    hub_cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch
):
    snapshot = next(hub_cache.rglob("snapshots/*"))
    incomplete = getattr(huggingface_hub.errors, "IncompleteSnapshotError", None)
    if incomplete is None:
        pytest.skip("this huggingface_hub has no IncompleteSnapshotError")

    def partial(*args, **kwargs):
        raise incomplete("2 files missing", snapshot_path=str(snapshot))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", partial)
    source = open_source(REPO)
    assert source.local_path("config.json") == f"{snapshot}/config.json"


def test_unreachable_hub_falls_back_to_the_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    assert isinstance(open_source(REPO), HubCacheSource)


class FakeHub:
    """repo_info / hf_hub_download / HfFileSystem backed by a local checkpoint directory."""

    def __init__(self, checkpoint: Path, cache: Path) -> None:
        self.checkpoint, self.cache = checkpoint, cache
        self.downloads: list[str] = []
        self.range_reads: list[str] = []
        self.tokens: list[object] = []

    def repo_info(self, api, repo_id, revision=None, files_metadata=False, **kwargs):
        self.tokens.append(api.token)
        files = [p for p in self.checkpoint.rglob("*") if p.is_file()]
        siblings = [
            SimpleNamespace(
                rfilename=p.relative_to(self.checkpoint).as_posix(), size=p.stat().st_size
            )
            for p in files
        ]
        return SimpleNamespace(sha=COMMIT, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision, token, cache_dir):
        assert revision == COMMIT  # pinned to the commit repo_info returned
        self.downloads.append(filename)
        repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        blob = repo_dir / "blobs" / sha256_file(self.checkpoint / filename)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.checkpoint / filename, blob)
        link = repo_dir / "snapshots" / revision / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
        return str(link)

    def filesystem(self, token=None):
        fake = self

        class FS:
            def cat_ranges(self, paths, starts, ends, on_error="raise"):
                out = []
                for path, start, end in zip(paths, starts, ends, strict=True):
                    name = path.split("@", 1)[1].split("/", 1)[1]
                    fake.range_reads.append(name)
                    out.append((fake.checkpoint / name).read_bytes()[start:end])
                return out

        return FS()


@pytest.fixture
def online(tmp_path: Path, sharded: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub(sharded.path, tmp_path / "online-cache")
    monkeypatch.setattr(
        huggingface_hub.HfApi, "repo_info", lambda self, *a, **k: fake.repo_info(self, *a, **k)
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", fake.filesystem)
    return fake


def test_online_downloads_lazily_per_file(online: FakeHub, sharded: Checkpoint, tmp_path: Path):
    source = open_source(f"hf://{REPO}", token="hf_secret_token", cache_dir=str(online.cache))
    assert (
        isinstance(source, HubSource)
        and "hf_secret" not in source.location
        and "hf_secret" not in repr(source)
    )
    assert online.tokens == ["hf_secret_token"]
    index = CheckpointIndex.load(source)
    assert online.downloads == ["model.safetensors.index.json"]  # shard headers by range reads
    assert sorted(set(online.range_reads)) == sorted(sharded.shards)
    plan = LayerPlan.from_index(index)
    reader = LayerReader(source, index)
    views = reader.read(plan.layers[0])  # layer 0: weights-a + zz/last
    assert {n: bytes(v) for n, v in views.items()} == {
        n: sharded.tensors[n].tobytes() for n in views
    }
    assert online.downloads[1:] == ["weights-a.safetensors", "zz/last.safetensors"]
    path = source.local_path("weights-a.safetensors")
    assert path.startswith(str(online.cache)) and "snapshots" in path
    reader.read(plan.layers[1])
    assert len(online.downloads) == 3  # cached: no second download
    # header reads of cached files are local now
    online.range_reads.clear()
    CheckpointIndex.load(source)
    assert online.range_reads == ["part_7.bin.safetensors", "part_7.bin.safetensors"]

    manifest = split_checkpoint(source, tmp_path / "split", progress=False, delete_original=True)
    got = tensors_of(tmp_path / "split")
    assert {n: a.tobytes() for n, a in got.items()} == {
        n: a.tobytes() for n, a in sharded.tensors.items()
    }
    assert sorted(manifest.deleted_shards) == sorted(sharded.shards)
    assert not list(online.cache.rglob("*.safetensors"))  # snapshot links of the shards gone...
    blobs = list(online.cache.rglob("blobs/*"))
    assert len(blobs) == len(online.downloads) - len(sharded.shards)  # ...and their blobs
