"""Compressed splits, store side (torch-free): the compression record, the manifest field, and
split_checkpoint driven by a SplitTransform (here a pure-python one written for the test)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rabbit_store import CheckpointIndex, open_source, split_checkpoint, verify_split
from rabbit_store.cli import main
from rabbit_store.compression import (
    MODES,
    CompressedTensor,
    CompressionRecord,
    CompressionScheme,
    CompressionSchemeError,
    packed_names,
)
from rabbit_store.constants import TEMP_SUFFIX
from rabbit_store.errors import InvalidCheckpointError, SplitError
from rabbit_store.inspect import describe
from rabbit_store.manifest import MANIFEST_FILE, Manifest
from rabbit_store.safetensors_header import DTYPE_BITS, TensorInfo
from rabbit_store.split import PlannedTensor, SplitTransform

from .store_helpers import Checkpoint, tensors_of

NP_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


# --- the record -----------------------------------------------------------------------------


KEY = "model.layers.0.mlp.down_proj.weight"
FUSED = "model.layers.0.mlp.experts.gate_up_proj"


def record_dict(**change: Any) -> dict[str, Any]:
    data = {
        "scheme": CompressionScheme(bits=4, group_size=64).to_dict(),
        "layout": "int4pack_cpu:AVX512",
        "tensors": {
            "model.layers.0.mlp.down_proj.weight": {
                "dtype": "BF16",
                "shape": [16, 64],
                "mode": "linear",
            },
            "model.layers.0.mlp.experts.gate_up_proj": {
                "dtype": "F16",
                "shape": [4, 64, 32],
                "mode": "dequant",
            },
        },
    }
    data.update(change)
    return data


def test_packed_names():
    assert packed_names("model.layers.0.mlp.down_proj.weight") == (
        "model.layers.0.mlp.down_proj.qweight",
        "model.layers.0.mlp.down_proj.scales",
    )
    assert packed_names("model.layers.0.mlp.experts.gate_up_proj") == (
        "model.layers.0.mlp.experts.gate_up_proj.qweight",
        "model.layers.0.mlp.experts.gate_up_proj.scales",
    )
    # only a trailing ".weight" is dropped
    assert packed_names("a.weight.b")[0] == "a.weight.b.qweight"


def test_record_round_trip_through_json():
    record = CompressionRecord.from_dict(json.loads(json.dumps(record_dict())), where="m.json")
    assert record.scheme == CompressionScheme(bits=4, group_size=64)
    assert record.layout == "int4pack_cpu:AVX512"
    assert record.tensors["model.layers.0.mlp.experts.gate_up_proj"] == CompressedTensor(
        dtype="F16", shape=(4, 64, 32), mode="dequant"
    )
    assert record.to_dict() == record_dict()
    assert record.packed() == {
        "model.layers.0.mlp.down_proj.qweight": "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.scales": "model.layers.0.mlp.down_proj.weight",
        f"{FUSED}.qweight": FUSED,
        f"{FUSED}.scales": FUSED,
    }
    assert record.original_nbytes == 16 * 64 * 2 + 4 * 64 * 32 * 2
    assert MODES == ("linear", "dequant")


def with_tensor(**change: Any) -> dict[str, Any]:
    data = record_dict()
    data["tensors"][KEY] = {**data["tensors"][KEY], **change}
    return data


def without(data: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != field}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("not a dict", "compression"),
        (record_dict(extra=1), "extra"),
        (without(record_dict(), "tensors"), "tensors"),
        (without(record_dict(), "layout"), "layout"),
        (record_dict(tensors={}), "tensors"),
        (record_dict(tensors=[]), "tensors"),
        (record_dict(layout=3), "layout"),
        (record_dict(layout=""), "layout"),
        (record_dict(scheme={**record_dict()["scheme"], "version": 2}), "scheme.version"),
        (record_dict(scheme={**record_dict()["scheme"], "new": 1}), "scheme.new"),
        (record_dict(scheme={**record_dict()["scheme"], "bits": 3}), "scheme.bits"),
        (record_dict(scheme=[]), "scheme"),
        (with_tensor(mode="fused"), f"tensors[{KEY}].mode"),
        (with_tensor(dtype="BF17"), f"tensors[{KEY}].dtype"),
        (with_tensor(shape=[16, -1]), f"tensors[{KEY}].shape"),
        (with_tensor(shape=[True, 2]), f"tensors[{KEY}].shape"),
        (with_tensor(order="nk"), f"tensors[{KEY}].order"),
        (record_dict(tensors={KEY: "x"}), f"tensors[{KEY}]"),
        (record_dict(tensors={KEY: {"dtype": "F16", "shape": [2]}}), f"tensors[{KEY}].mode"),
        (
            record_dict(
                tensors={
                    KEY: {"dtype": "F16", "shape": [2], "mode": "linear"},
                    KEY.removesuffix(".weight"): {"dtype": "F16", "shape": [2], "mode": "linear"},
                }
            ),
            f"tensors[{KEY.removesuffix('.weight')}]",
        ),
    ],
)
def test_record_refuses_what_it_does_not_know(data: Any, field: str):
    with pytest.raises(CompressionSchemeError) as caught:
        CompressionRecord.from_dict(data, where="/x/rabbit-split.json")
    assert caught.value.field == field
    assert "/x/rabbit-split.json" in str(caught.value)
    assert isinstance(caught.value, InvalidCheckpointError)


def test_manifest_refuses_a_bad_record_when_read():
    manifest = Manifest(
        source="s", source_fingerprint="f", layer_prefix="p", num_layers=0, tied=False
    )
    assert manifest.compression is None and manifest.compression_record() is None
    manifest.compression = record_dict()
    again = Manifest.from_json(manifest.to_json(), where="/d/rabbit-split.json")
    assert again.compression_record() == CompressionRecord.from_dict(record_dict(), where="x")

    manifest.compression = with_tensor(mode="fused")
    with pytest.raises(CompressionSchemeError, match="/d/rabbit-split.json") as caught:
        Manifest.from_json(manifest.to_json(), where="/d/rabbit-split.json")
    assert caught.value.field == f"tensors[{KEY}].mode"
    unchecked = Manifest.from_json(
        manifest.to_json(), where="/d/rabbit-split.json", check_compression=False
    )
    assert unchecked.compression == with_tensor(mode="fused")

    old = json.loads(again.to_json())
    old["version"] = 2
    with pytest.raises(SplitError, match="version 2 manifests have no compression"):
        Manifest.from_json(json.dumps(old), where="/d/rabbit-split.json")
    old["compression"] = None
    assert Manifest.from_json(json.dumps(old), where="/d/rabbit-split.json").version == 3


# --- a transform driving the split ----------------------------------------------------------


class HalfTransform:
    """Replaces every 2-D float tensor of a layer file K by `packed_names(K)`: a U8 "qweight" of
    every other byte of K (half its bytes, one row per row of K) and an F32 "scales" vector (the
    first byte of each row, as a float). Everything else in the file is copied; other files are
    left to the splitter."""

    def __init__(self, checkpoint: Checkpoint, layout: str = "test:half") -> None:
        self.compressed = {
            name: array
            for name, array in checkpoint.tensors.items()
            if ".layers." in name and array.ndim == 2 and array.dtype in NP_DTYPES
        }
        self.layout = layout
        self.calls: list[tuple[str, int | None]] = []

    @property
    def record(self) -> dict[str, Any]:
        return {
            "scheme": CompressionScheme(bits=8).to_dict(),
            "layout": self.layout,
            "tensors": {
                name: {"dtype": NP_DTYPES[a.dtype], "shape": list(a.shape), "mode": "linear"}
                for name, a in self.compressed.items()
            },
        }

    def _plan(self, infos: list[TensorInfo]) -> list[tuple[PlannedTensor, TensorInfo, str]]:
        planned: list[tuple[PlannedTensor, TensorInfo, str]] = []
        for info in infos:
            if info.name in self.compressed:
                qweight, scales = packed_names(info.name)
                rows, row_bytes = info.shape[0], info.nbytes // info.shape[0]
                planned.append((PlannedTensor(scales, "F32", (rows,)), info, "scales"))
                planned.append((PlannedTensor(qweight, "U8", (rows, row_bytes // 2)), info, "q"))
            else:
                planned.append((PlannedTensor(info.name, info.dtype, info.shape), info, "copy"))
        # widest first, so that every tensor stays aligned
        return sorted(planned, key=lambda p: -DTYPE_BITS[p[0].dtype])

    def outputs(
        self, part: str, layer: int | None, infos: list[TensorInfo]
    ) -> list[PlannedTensor] | None:
        if part != "layer":
            return None
        return [p for p, _, _ in self._plan(infos)]

    def produce(
        self,
        part: str,
        layer: int | None,
        infos: list[TensorInfo],
        read: Callable[[TensorInfo], memoryview | bytes],
    ) -> Iterator[bytes | memoryview]:
        self.calls.append((part, layer))
        for _, info, kind in self._plan(infos):
            data = bytes(read(info))
            if kind == "copy":
                yield data
            elif kind == "q":
                yield data[::2]
            else:
                yield expected_scales(data, info.shape[0]).tobytes()


def expected_scales(data: bytes, rows: int) -> np.ndarray:
    row_bytes = len(data) // rows
    return np.array([data[r * row_bytes] for r in range(rows)], dtype=np.float32)


def check_compressed(dest: Path, checkpoint: Checkpoint, transform: HalfTransform) -> None:
    """Every file holds what the transform planned, with the bytes it produced."""
    got = tensors_of(dest)
    for name, array in checkpoint.tensors.items():
        if name in transform.compressed:
            qweight, scales = packed_names(name)
            raw = array.tobytes()
            assert got[qweight].dtype == np.uint8 and got[qweight].shape == (
                array.shape[0],
                array.nbytes // array.shape[0] // 2,
            )
            assert got[qweight].tobytes() == raw[::2]
            np.testing.assert_array_equal(got[scales], expected_scales(raw, array.shape[0]))
            assert name not in got
        else:
            assert got[name].dtype == array.dtype
            np.testing.assert_array_equal(got[name], array)
    assert len(got) == len(checkpoint.tensors) + len(transform.compressed)


def test_transformed_split_is_written_recorded_and_verified(sharded: Checkpoint, tmp_path: Path):
    dest = tmp_path / "dest"
    transform = HalfTransform(sharded)
    hook: SplitTransform = transform  # what the engine implements
    assert transform.compressed
    manifest = split_checkpoint(str(sharded.path), str(dest), progress=False, transform=hook)
    assert manifest.compression == transform.record
    assert transform.calls == [("layer", i) for i in range(4)]
    check_compressed(dest, sharded, transform)

    index = CheckpointIndex.load(open_source(str(dest)), verify_checksums=True)
    assert index.manifest is not None
    record = index.manifest.compression_record()
    assert record == CompressionRecord.from_dict(transform.record, where="test")
    assert set(record.packed()) <= set(index.tensors)
    on_disk = json.loads((dest / MANIFEST_FILE).read_text())
    assert on_disk["version"] == 3 and on_disk["compression"] == transform.record
    index_file = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index_file["weight_map"] == manifest.weight_map()
    assert verify_split(str(dest)).ok

    layer = dest / "layer-00001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-3])
    result = verify_split(str(dest))
    assert list(result.problems) == ["layer-00001.safetensors"]
    assert result.problems["layer-00001.safetensors"].startswith("size")


def test_plain_split_has_no_compression(single: Checkpoint, tmp_path: Path):
    dest = tmp_path / "dest"
    manifest = split_checkpoint(str(single.path), str(dest), progress=False)
    assert manifest.compression is None
    assert json.loads((dest / MANIFEST_FILE).read_text())["compression"] is None
    index = CheckpointIndex.load(open_source(str(dest)))
    assert index.manifest is not None and index.manifest.compression_record() is None
    assert describe(str(dest))["compression"] is None
    assert describe(str(single.path))["compression"] is None  # not a split at all
    assert sorted(tensors_of(dest)) == sorted(single.tensors)


def inodes(dest: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in dest.glob("*.safetensors")}


def test_rerun_reuses_files_and_another_record_rewrites_them(
    sharded: Checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    dest = tmp_path / "dest"
    split_checkpoint(str(sharded.path), str(dest), progress=False, transform=HalfTransform(sharded))
    first = inodes(dest)

    again = HalfTransform(sharded)
    split_checkpoint(str(sharded.path), str(dest), progress=False, transform=again)
    assert inodes(dest) == first and again.calls == []

    other = HalfTransform(sharded, layout="test:half-v2")
    with caplog.at_level(logging.WARNING):
        manifest = split_checkpoint(str(sharded.path), str(dest), progress=False, transform=other)
    assert "rewriting every file" in caplog.text
    assert manifest.compression["layout"] == "test:half-v2"
    assert len(other.calls) == 4
    second = inodes(dest)
    assert all(second[name] != first[name] for name in first)  # the copied files too
    check_compressed(dest, sharded, other)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plain = split_checkpoint(str(sharded.path), str(dest), progress=False)
    assert "without compression" in caplog.text and plain.compression is None
    assert sorted(tensors_of(dest)) == sorted(sharded.tensors)
    assert verify_split(str(dest)).ok


class WrongLength(HalfTransform):
    """Produces one byte too few for one tensor of layer 2."""

    victim = "model.layers.2.mlp.down_proj.qweight"

    def produce(self, part, layer, infos, read):  # type: ignore[no-untyped-def]
        planned = self.outputs(part, layer, infos)
        assert planned is not None
        for tensor, chunk in zip(planned, super().produce(part, layer, infos, read), strict=True):
            yield chunk[:-1] if tensor.name == self.victim else chunk


class TooFew(HalfTransform):
    def produce(self, part, layer, infos, read):  # type: ignore[no-untyped-def]
        chunks = list(super().produce(part, layer, infos, read))
        yield from chunks[:-1]


class TooMany(HalfTransform):
    def produce(self, part, layer, infos, read):  # type: ignore[no-untyped-def]
        yield from super().produce(part, layer, infos, read)
        yield b"extra"


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            WrongLength,
            r"layer-00002\.safetensors: .* bytes for tensor "
            r"'model\.layers\.2\.mlp\.down_proj\.qweight'",
        ),
        (TooFew, r"layer-00000\.safetensors: the split transform produced no data for tensor"),
        (TooMany, r"layer-00000\.safetensors: the split transform produced more tensors"),
    ],
)
def test_a_chunk_that_does_not_match_the_plan_leaves_no_file(
    sharded: Checkpoint, tmp_path: Path, cls: type[HalfTransform], message: str
):
    dest = tmp_path / "dest"
    with pytest.raises(SplitError, match=message):
        split_checkpoint(str(sharded.path), str(dest), progress=False, transform=cls(sharded))
    failed = "layer-00002.safetensors" if cls is WrongLength else "layer-00000.safetensors"
    left = os.listdir(dest)
    assert failed not in left
    assert not [n for n in left if n.endswith(TEMP_SUFFIX)]  # no temporary either
    assert MANIFEST_FILE not in left
    # the files written before stay recorded; a good rerun completes the split
    good = HalfTransform(sharded)
    split_checkpoint(str(sharded.path), str(dest), progress=False, transform=good)
    assert verify_split(str(dest)).ok
    check_compressed(dest, sharded, good)


def test_a_bad_record_is_refused_before_anything_is_written(sharded: Checkpoint, tmp_path: Path):
    class BadRecord(HalfTransform):
        @property
        def record(self) -> dict[str, Any]:
            return {**super().record, "layout": 7}

    dest = tmp_path / "dest"
    with pytest.raises(CompressionSchemeError, match="record of split transform") as caught:
        split_checkpoint(str(sharded.path), str(dest), progress=False, transform=BadRecord(sharded))
    assert caught.value.field == "layout"
    assert not dest.exists()


def test_a_bad_plan_is_refused(sharded: Checkpoint, tmp_path: Path):
    class Twice(HalfTransform):
        def outputs(self, part, layer, infos):  # type: ignore[no-untyped-def]
            planned = super().outputs(part, layer, infos)
            return None if planned is None else planned + planned[:1]

    class SubByte(HalfTransform):
        def outputs(self, part, layer, infos):  # type: ignore[no-untyped-def]
            planned = super().outputs(part, layer, infos)
            return None if planned is None else [*planned, PlannedTensor("odd", "F4", (3,))]

    with pytest.raises(SplitError, match="layer-00000.safetensors: .* planned tensor .* twice"):
        split_checkpoint(
            str(sharded.path), str(tmp_path / "a"), progress=False, transform=Twice(sharded)
        )
    with pytest.raises(SplitError, match="planned tensor 'odd' .* does not fill whole bytes"):
        split_checkpoint(
            str(sharded.path), str(tmp_path / "b"), progress=False, transform=SubByte(sharded)
        )


def test_transformed_split_to_a_remote_destination(sharded: Checkpoint):
    import fsspec

    url = "memory://rabbit-compression-test/out"
    transform = HalfTransform(sharded)
    try:
        manifest = split_checkpoint(str(sharded.path), url, progress=False, transform=transform)
        assert manifest.compression == transform.record and verify_split(url).ok
        # and a remote source: read() takes the ranged-read path
        remote = HalfTransform(sharded)
        out = "memory://rabbit-compression-test/again"
        fs = fsspec.filesystem("memory")
        for file in sharded.path.rglob("*"):
            if file.is_file():
                fs.put_file(
                    str(file), f"/rabbit-compression-test/src/{file.relative_to(sharded.path)}"
                )
        again = split_checkpoint(
            "memory://rabbit-compression-test/src", out, progress=False, transform=remote
        )
        assert again.compression == transform.record and verify_split(out).ok
        assert len(remote.calls) == 4
    finally:
        fsspec.filesystem("memory").rm("/rabbit-compression-test", recursive=True)


# --- verify and inspect ---------------------------------------------------------------------


@pytest.fixture
def compressed(sharded: Checkpoint, tmp_path: Path) -> Path:
    dest = tmp_path / "compressed"
    split_checkpoint(str(sharded.path), str(dest), progress=False, transform=HalfTransform(sharded))
    return dest


def test_a_bad_record_fails_verification_naming_the_manifest(
    compressed: Path, capsys: pytest.CaptureFixture[str]
):
    raw = json.loads((compressed / MANIFEST_FILE).read_text())
    raw["compression"]["scheme"]["version"] = 99
    (compressed / MANIFEST_FILE).write_text(json.dumps(raw))

    result = verify_split(str(compressed))
    assert list(result.problems) == [MANIFEST_FILE]
    assert "scheme.version" in result.problems[MANIFEST_FILE]
    with pytest.raises(CompressionSchemeError, match=f"{compressed}/{MANIFEST_FILE}"):
        CheckpointIndex.load(open_source(str(compressed)))

    assert main(["verify", str(compressed)]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPTED {MANIFEST_FILE}: compression record:" in err
    assert "Traceback" not in err


def test_inspect_shows_the_compression(
    compressed: Path, sharded: Checkpoint, capsys: pytest.CaptureFixture[str]
):
    info = describe(str(compressed))
    summary = info["compression"]
    compressed_names = HalfTransform(sharded).compressed
    assert summary["scheme"] == "8bit" and summary["bits"] == 8
    assert summary["group_size"] is None and summary["scale_dtype"] == "bfloat16"
    assert summary["layout"] == "test:half"
    assert summary["compressed_tensors"] == len(compressed_names) == 12
    assert summary["modes"] == {"linear": 12}
    sizes = {p.name: p.stat().st_size for p in compressed.glob("layer-*.safetensors")}
    assert {f["name"]: f["bytes"] for f in summary["layer_files"]} == sizes
    assert [f["layer"] for f in summary["layer_files"]] == [0, 1, 2, 3]
    assert summary["original_bytes"] == sum(a.nbytes for a in sharded.tensors.values())
    assert summary["bytes"] == info["total_bytes"] < summary["original_bytes"]

    assert main(["inspect", str(compressed)]) == 0
    out = capsys.readouterr().out
    assert "compression: 8bit (8-bit, per output channel, scales bfloat16), layout test:half" in out
    assert "compressed tensors: 12 (12 linear)" in out
    assert "uncompressed (" in out and "layer-00003.safetensors:" in out
    assert main(["inspect", str(compressed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compression"] == summary
