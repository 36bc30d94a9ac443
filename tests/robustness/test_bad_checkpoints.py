"""Every malformed checkpoint is a typed RabbitError naming the file, tensor or option and saying
what to do; the `rabbit-store` CLI turns it into one line on stderr and exit status 2; nothing is
written anywhere.

Each case builds a small, valid checkpoint and breaks one thing in it, as a download gone wrong, a
hand-edited index or a hostile repo would.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rabbit_store import CheckpointIndex, LayerPlan, open_source, split_checkpoint
from rabbit_store.errors import (
    CheckpointNotFoundError,
    HeaderError,
    IncompleteLayerError,
    IndexFileError,
    RabbitError,
    ShardNotFoundError,
)
from rabbit_store.inspect import describe
from rabbit_store.manifest import MANIFEST_FILE
from tests.store.store_helpers import model_tensors, odd_shards, write_checkpoint

from .conftest import assert_one_line_error, finish, snapshot, start_store_cli, store_cli

INDEX = "model.safetensors.index.json"


def sharded(path: Path) -> Path:
    tensors = model_tensors(num_layers=4)
    return write_checkpoint(path, tensors, odd_shards(tensors)).path


def single(path: Path) -> Path:
    return write_checkpoint(path, model_tensors(num_layers=3)).path


def raw_single(
    header: object, data: bytes = b"", *, length: int | None = None
) -> Callable[[Path], Path]:
    """A model.safetensors with exactly this header (and a valid config beside it)."""

    def build(path: Path) -> Path:
        single(path)
        body = header if isinstance(header, bytes) else json.dumps(header).encode()
        prefix = struct.pack("<Q", len(body) if length is None else length)
        (path / "model.safetensors").write_bytes(prefix + body + data)
        return path

    return build


def edit_index(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        sharded(path)
        index = json.loads((path / INDEX).read_text())
        change(index["weight_map"])
        (path / INDEX).write_text(json.dumps(index))
        return path

    return build


def mutate(
    file: str, change: Callable[[bytes], bytes], base: Callable[[Path], Path] = sharded
) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        base(path)
        target = path / file
        target.write_bytes(change(target.read_bytes()))
        return path

    return build


def missing_layer(path: Path) -> Path:
    tensors = {n: a for n, a in model_tensors(num_layers=4).items() if ".2." not in n}
    return write_checkpoint(path, tensors).path


def unfinished_split(path: Path) -> Path:
    src = single(path.parent / (path.name + "-src"))
    split_checkpoint(src, path, progress=False)
    (path / INDEX).unlink()
    (path / MANIFEST_FILE).rename(path / "rabbit-split.partial.json")
    return path


def config_only(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


@dataclass
class Case:
    build: Callable[[Path], Path] | None  # None: the path does not exist
    error: type[RabbitError]
    says: tuple[str, ...]  # fragments the message must hold: the file/tensor, and what to do


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CASES: dict[str, Case] = {
    "missing path": Case(
        None, CheckpointNotFoundError, ("case-dir", "is not a directory", "pass the directory")
    ),
    "no checkpoint files": Case(
        config_only, CheckpointNotFoundError, ("model.safetensors", "pass the directory")
    ),
    "index names a missing shard": Case(
        edit_index(lambda m: m.update({"model.norm.weight": "model-00009-of-00009.safetensors"})),
        ShardNotFoundError,
        ("model-00009-of-00009.safetensors", "Re-download"),
    ),
    "index entry ../x": Case(
        edit_index(lambda m: m.update({"model.norm.weight": "../x.safetensors"})),
        IndexFileError,
        ("'../x.safetensors'", "model.norm.weight", "outside the model directory"),
    ),
    "index entry absolute": Case(
        edit_index(lambda m: m.update({"lm_head.weight": "/etc/passwd"})),
        IndexFileError,
        ("'/etc/passwd'", "lm_head.weight", "relative to the model directory"),
    ),
    "index entry URL": Case(
        edit_index(lambda m: m.update({"lm_head.weight": "https://evil.example/x.safetensors"})),
        IndexFileError,
        ("https://evil.example/x.safetensors", "relative to the model directory"),
    ),
    "empty index": Case(
        mutate(INDEX, lambda b: b""), IndexFileError, (INDEX, "not valid JSON", "re-download")
    ),
    "truncated shard": Case(
        mutate("zz/last.safetensors", lambda b: b[: len(b) - 100]),
        HeaderError,
        ("zz/last.safetensors", "truncated", "re-download"),
    ),
    "empty shard": Case(
        mutate("weights-a.safetensors", lambda b: b""),
        HeaderError,
        ("weights-a.safetensors", "too short", "re-download"),
    ),
    "header length past the end": Case(
        raw_single({"t": F32}, b"\0" * 8, length=10_000),
        HeaderError,
        ("model.safetensors", "runs past the end", "re-download"),
    ),
    "header length 2**60": Case(
        raw_single({"t": F32}, b"\0" * 8, length=2**60),
        HeaderError,
        ("model.safetensors", "exceeds", "re-download"),
    ),
    "header not JSON": Case(
        raw_single(b"{not json}"),
        HeaderError,
        ("model.safetensors", "not valid UTF-8 JSON", "re-download"),
    ),
    "header not an object": Case(
        raw_single([1, 2, 3]),
        HeaderError,
        ("model.safetensors", "expected an object", "re-download"),
    ),
    "unknown dtype": Case(
        raw_single({"t": {**F32, "dtype": "F12"}}, b"\0" * 8),
        HeaderError,
        ("model.safetensors", "'t'", "unknown dtype 'F12'", "upgrade or re-download"),
    ),
    "data_offsets past the file": Case(
        raw_single({"t": {**F32, "data_offsets": [0, 8]}}, b"\0" * 4),
        HeaderError,
        ("model.safetensors", "'t'", "past the 4 data bytes", "re-download"),
    ),
    "data_offsets overlapping": Case(
        raw_single({"t": F32, "u": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
        HeaderError,
        ("model.safetensors", "'t' and 'u' overlap", "re-download"),
    ),
    "data_offsets not shape x dtype": Case(
        raw_single({"t": {**F32, "shape": [3]}}, b"\0" * 8),
        HeaderError,
        ("model.safetensors", "'t'", "shape [3] of F32 needs 12", "re-download"),
    ),
    "a decoder layer missing": Case(
        missing_layer,
        IncompleteLayerError,
        ("decoder layers 2 of model.layers.0..3", "re-download"),
    ),
    "unfinished split": Case(
        unfinished_split, CheckpointNotFoundError, ("unfinished split", "rerun `rabbit-store split")
    ),
}


def build_case(name: str, root: Path) -> Path:
    path = root / name.replace(" ", "-").replace("*", "") / "case-dir"
    case = CASES[name]
    return path if case.build is None else case.build(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_raises_a_typed_error_that_says_what_to_do(name: str, tmp_path: Path):
    path = build_case(name, tmp_path)
    before = snapshot(tmp_path)
    case = CASES[name]
    with pytest.raises(case.error) as err:
        LayerPlan.from_index(CheckpointIndex.load(open_source(path)))
    for fragment in case.says:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert len(str(err.value)) < 1500
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_cli_exits_2_with_one_line_for_each(tmp_path: Path):
    paths = {name: build_case(name, tmp_path) for name in CASES}
    before = snapshot(tmp_path)
    # one subprocess per case, all at once: the import cost is paid in parallel
    procs = {name: start_store_cli("inspect", str(path)) for name, path in paths.items()}
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, result in results.items():
        says = [f for f in CASES[name].says if "`" not in f]
        assert_one_line_error(result, *says)
        assert result.stdout == "", name
    assert snapshot(tmp_path) == before


def test_split_of_a_bad_checkpoint_creates_nothing(tmp_path: Path):
    path = build_case("truncated shard", tmp_path)
    before = snapshot(tmp_path)
    result = store_cli("split", str(path), str(tmp_path / "dest"), "--quiet")
    assert_one_line_error(result, "zz/last.safetensors", "truncated")
    assert snapshot(tmp_path) == before  # not even the destination directory


def test_extra_tensors_in_a_shard_are_a_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A shard holding a tensor its index does not list: indexed without it, with a warning."""
    path = sharded(tmp_path / "extra")
    index = json.loads((path / INDEX).read_text())
    del index["weight_map"]["model.layers.0.mlp.gate.qweight"]
    (path / INDEX).write_text(json.dumps(index))
    with caplog.at_level("WARNING", logger="rabbit_store"):
        loaded = CheckpointIndex.load(open_source(path))
    assert "model.layers.0.mlp.gate.qweight" not in loaded.tensors
    assert any(
        "model.layers.0.mlp.gate.qweight" in r.getMessage() and "ignored" in r.getMessage()
        for r in caplog.records
    )
    assert describe(path)["num_layers"] == 4
