"""split_checkpoint / verify_split: byte-identical, loadable, atomic, resumable, delete_original."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import filelock
import pytest

import rabbit_store.split as split_module
import rabbit_store.verify as verify_module
from rabbit_store import (
    CheckpointIndex,
    LayerPlan,
    LayerReader,
    open_source,
    split_checkpoint,
    verify_split,
)
from rabbit_store.errors import InvalidOptionError, ManifestNotFoundError, SplitCorruptedError
from rabbit_store.manifest import MANIFEST_FILE, PARTIAL_MANIFEST_FILE
from rabbit_store.split import bytecopy, splitter

from .store_helpers import (
    Checkpoint,
    model_tensors,
    odd_shards,
    sha256_file,
    tensors_of,
    write_checkpoint,
)


def same_tensors(path: Path, checkpoint: Checkpoint) -> None:
    got = tensors_of(path)
    assert sorted(got) == sorted(checkpoint.tensors)
    for name, array in checkpoint.tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


def digests(path: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.mark.parametrize("layout", ["sharded", "single", "gpt2"])
def test_split_is_byte_identical_and_a_checkpoint(
    tmp_path: Path, layout: str, request: pytest.FixtureRequest
):
    if layout == "gpt2":
        checkpoint = write_checkpoint(
            tmp_path / "gpt2", model_tensors("gpt2", num_layers=2, tied=True)
        )
    else:
        checkpoint = request.getfixturevalue(layout)
    dest = tmp_path / "new" / "nested" / "split"  # created
    manifest = split_checkpoint(str(checkpoint.path), str(dest), progress=False)
    same_tensors(dest, checkpoint)
    files = sorted(p.name for p in dest.glob("*.safetensors"))
    plan = LayerPlan.from_index(CheckpointIndex.load(open_source(str(checkpoint.path))))
    assert len(files) == plan.num_layers + sum(
        bool(p) for p in (plan.embeddings, plan.norm, plan.lm_head, plan.other)
    )
    assert manifest.layers == [f"layer-{i:05d}.safetensors" for i in range(plan.num_layers)]
    assert manifest.tied is plan.tied and manifest.complete
    assert (dest / "config.json").read_bytes() == (checkpoint.path / "config.json").read_bytes()
    assert (dest / "tokenizer_config.json").exists() and not (dest / "README.md").exists()
    # the split is itself a checkpoint: same plan, same bytes through the reader
    index = CheckpointIndex.load(open_source(str(dest)))
    split_plan = LayerPlan.from_index(index)
    assert [sorted(x) for x in split_plan.layers] == [sorted(x) for x in plan.layers]
    assert {index.tensors[n].file for n in split_plan.layers[1]} == {"layer-00001.safetensors"}
    views = LayerReader(open_source(str(dest)), index).read(split_plan.layers[0])
    assert {n: bytes(v) for n, v in views.items()} == {
        n: checkpoint.tensors[n].tobytes() for n in views
    }
    saved = json.loads((dest / MANIFEST_FILE).read_text())
    assert (
        saved["source_fingerprint"]
        == CheckpointIndex.load(open_source(str(checkpoint.path))).fingerprint
    )
    assert all(len(f["sha256"]) == 64 for f in saved["files"])
    assert not (dest / PARTIAL_MANIFEST_FILE).exists()
    assert verify_split(str(dest)).ok


def test_split_loads_in_transformers(tmp_path: Path):
    """A tiny Llama saved by transformers in shards, split, loads back with identical weights."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "src", max_shard_size="10KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    split_checkpoint(str(tmp_path / "src"), str(tmp_path / "split"), progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_interrupted_split_resumes_to_identical_bytes(
    sharded: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    reference = tmp_path / "reference"
    split_checkpoint(str(sharded.path), str(reference), progress=False)

    dest = tmp_path / "dest"
    written: list[str] = []
    real = splitter.Splitter._write_group

    def crash_on_third(self, name, infos, header, bar):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies mid-split
        written.append(name)
        return real(self, name, infos, header, bar)

    monkeypatch.setattr(splitter.Splitter, "_write_group", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(str(sharded.path), str(dest), progress=False)
    monkeypatch.undo()
    assert (dest / PARTIAL_MANIFEST_FILE).exists() and not (dest / MANIFEST_FILE).exists()
    with pytest.raises(ManifestNotFoundError, match="unfinished"):
        verify_split(str(dest))
    # leftovers of a harder crash: a temp file and a half-written layer file under its final name
    (dest / ".layer-00002.safetensors.deadbeef.incomplete").write_bytes(b"partial")
    (dest / "layer-00002.safetensors").write_bytes(
        (reference / "layer-00002.safetensors").read_bytes()[:100]
    )

    rewritten: list[str] = []
    monkeypatch.setattr(
        splitter.Splitter,
        "_write_group",
        lambda self, name, *a: rewritten.append(name) or real(self, name, *a),
    )
    split_checkpoint(str(sharded.path), str(dest), progress=False)
    assert written[0] not in rewritten and written[1] not in rewritten  # verified and skipped
    assert "layer-00002.safetensors" in rewritten
    assert not list(dest.glob(".*.incomplete"))
    assert digests(dest) == digests(reference)


def test_corrupted_finished_file_is_rewritten_on_rerun(sharded: Checkpoint, tmp_path: Path):
    dest = tmp_path / "dest"
    split_checkpoint(str(sharded.path), str(dest), progress=False)
    before = digests(dest)
    victim = dest / "layer-00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, same header, different bytes: only sha256 can tell
    victim.write_bytes(bytes(data))
    result = verify_split(str(dest))
    assert not result.ok and "sha256" in result.problems["layer-00001.safetensors"]
    split_checkpoint(str(sharded.path), str(dest), progress=False)
    assert digests(dest) == before


def test_verify_finds_each_kind_of_damage(sharded: Checkpoint, tmp_path: Path):
    dest = tmp_path / "dest"
    split_checkpoint(str(sharded.path), str(dest), progress=False)
    (dest / "layer-00000.safetensors").unlink()
    with open(dest / "layer-00002.safetensors", "ab") as handle:
        handle.write(b"x")
    (dest / "norm.safetensors").write_bytes(b"\xff" * (dest / "norm.safetensors").stat().st_size)
    problems = verify_split(str(dest)).problems
    assert problems["layer-00000.safetensors"] == "missing"
    assert problems["layer-00002.safetensors"].startswith("size")
    assert problems["norm.safetensors"].startswith("bad header")
    assert len(problems) == 3
    with pytest.raises(ManifestNotFoundError, match="not a finished split"):
        verify_split(str(tmp_path / "empty"))


def test_delete_original_after_verification_once(
    sharded: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    deleted: list[str] = []
    from rabbit_store.sources import FsspecSource

    real_delete = FsspecSource.delete

    def record(self, name):
        # a shard is deleted only after every layer drawn from it is in the manifest
        files = {f.name for f in splitter_state["manifest"].files}
        needs = {
            split_module.layer_file_name(part, layer)
            for part, layer, names in splitter_state["plan"].groups()
            if any(splitter_state["index"].tensors[n].file == name for n in names)
        }
        assert needs <= files, (name, needs - files)
        deleted.append(name)
        real_delete(self, name)

    splitter_state: dict = {}
    real_init = splitter.Splitter.__init__

    def capture(self, source, index, plan, *a, **k):
        real_init(self, source, index, plan, *a, **k)
        splitter_state.update(manifest=self.manifest, plan=plan, index=index)

    monkeypatch.setattr(splitter.Splitter, "__init__", capture)
    monkeypatch.setattr(FsspecSource, "delete", record)
    manifest = split_checkpoint(
        str(sharded.path), str(tmp_path / "dest"), delete_original=True, progress=False
    )
    assert sorted(deleted) == sorted(sharded.shards)  # each once
    assert sorted(manifest.deleted_shards) == sorted(sharded.shards)
    assert not list(sharded.path.rglob("*.safetensors"))
    same_tensors(tmp_path / "dest", sharded)


def test_delete_original_keeps_shards_when_verification_fails(
    sharded: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(
        verify_module, "check_file", lambda source, entry, check_hash=True: "sha256 mismatch"
    )
    with pytest.raises(SplitCorruptedError, match="originals were not deleted"):
        split_checkpoint(
            str(sharded.path), str(tmp_path / "dest"), delete_original=True, progress=False
        )
    assert sorted(
        p.relative_to(sharded.path).as_posix() for p in sharded.path.rglob("*.safetensors")
    ) == sorted(sharded.shards)


def test_resume_after_delete_original_was_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    tensors = model_tensors(num_layers=4)
    checkpoint = write_checkpoint(tmp_path / "src", tensors, odd_shards(tensors))
    keep = {n: a.copy() for n, a in tensors.items()}
    real = splitter.Splitter._write_group
    calls = []

    def crash_late(self, name, *a):
        if name == "layer-00003.safetensors":
            raise KeyboardInterrupt
        calls.append(name)
        return real(self, name, *a)

    monkeypatch.setattr(splitter.Splitter, "_write_group", crash_late)
    monkeypatch.setattr(bytecopy, "HASH_WORKERS", 1)  # files finish one behind the copy
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(
            str(checkpoint.path), str(tmp_path / "dest"), delete_original=True, progress=False
        )
    monkeypatch.undo()
    assert not (
        checkpoint.path / "weights-a.safetensors"
    ).exists()  # layers 0, 1 and embeddings done
    with pytest.raises(Exception, match="weights-a.safetensors"):
        CheckpointIndex.load(open_source(str(checkpoint.path)))
    manifest = split_checkpoint(
        str(checkpoint.path), str(tmp_path / "dest"), delete_original=True, progress=False
    )
    assert sorted(manifest.deleted_shards) == sorted(checkpoint.shards)
    same_tensors(tmp_path / "dest", Checkpoint(checkpoint.path, keep, checkpoint.shards))


def test_a_second_split_waits_for_the_lock(sharded: Checkpoint, tmp_path: Path):
    dest = tmp_path / "dest"
    dest.mkdir()
    held = filelock.FileLock(str(dest / ".rabbit-split.lock"))
    held.acquire()
    finished: list[float] = []
    worker = threading.Thread(
        target=lambda: finished.append(
            split_checkpoint(str(sharded.path), str(dest), progress=False) and time.monotonic()
        )
    )
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and not (dest / MANIFEST_FILE).exists()
    released = time.monotonic()
    held.release()
    worker.join(10)
    assert finished and finished[0] >= released and verify_split(str(dest)).ok


def test_destination_holding_another_split_is_overwritten(
    sharded: Checkpoint, single: Checkpoint, tmp_path: Path
):
    dest = tmp_path / "dest"
    split_checkpoint(str(single.path), str(dest), progress=False)
    manifest = split_checkpoint(str(sharded.path), str(dest), progress=False)
    assert manifest.num_layers == 4 and verify_split(str(dest)).ok
    assert (
        json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
        == manifest.weight_map()
    )


def test_manifest_versions(sharded: Checkpoint, tmp_path: Path):
    """Version 1 manifests (no header digests) still load and verify; a newer version is refused
    with a message that says so, never half-read."""
    from rabbit_store.errors import SplitError

    dest = tmp_path / "dest"
    split_checkpoint(str(sharded.path), str(dest), progress=False)
    raw = json.loads((dest / MANIFEST_FILE).read_text())
    assert raw["version"] == 3 and all(
        f["header_sha256"] for f in raw["files"] if f["part"] != "aux"
    )
    old = dict(
        raw,
        version=1,
        files=[{k: v for k, v in f.items() if k != "header_sha256"} for f in raw["files"]],
    )
    (dest / MANIFEST_FILE).write_text(json.dumps(old))
    assert verify_split(str(dest)).ok
    index = CheckpointIndex.load(open_source(str(dest)))
    assert sorted(index.tensors) == sorted(sharded.tensors)
    (dest / MANIFEST_FILE).write_text(json.dumps(dict(raw, version=4)))
    with pytest.raises(SplitError, match="newer rabbit-store"):
        verify_split(str(dest))


def test_destination_cannot_be_the_source(sharded: Checkpoint):
    with pytest.raises(InvalidOptionError, match="is the source directory"):
        split_checkpoint(str(sharded.path), str(sharded.path) + "/.", progress=False)


def test_memory_destination(sharded: Checkpoint):
    import fsspec

    manifest = split_checkpoint(str(sharded.path), "memory://rabbit-split-test/out", progress=False)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/rabbit-split-test/out/rabbit-split.json")
    assert verify_split("memory://rabbit-split-test/out").ok
    assert len(manifest.layers) == 4


def test_copy_range_falls_back_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(os.urandom(1000))
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    with open(src, "rb") as s, open(dst, "wb") as d:
        d.write(b"HEAD")
        bytecopy.copy_range(s.fileno(), d.fileno(), 10, 500, 4)
    assert dst.read_bytes() == b"HEAD" + src.read_bytes()[10:510]
