"""Bad compressed splits and bad `compression=`: typed errors that name the file, field or tensor at
fault, before any number is computed; never a deep traceback, never silently wrong logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rabbit_engine.errors import InvalidOptionError, WeightMismatchError
from rabbit_engine.quant import compress_checkpoint
from rabbit_store.compression import CompressionSchemeError
from rabbit_store.constants import MANIFEST_FILE
from rabbit_store.errors import RabbitError
from rabbitllm import AutoModel
from tests.models.families import build_model, save_checkpoint

F32 = torch.float32


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "rabbit-cache"
    monkeypatch.setenv("RABBITLLM_CACHE", str(path))
    return path


@pytest.fixture
def src(tmp_path) -> Path:
    return save_checkpoint(build_model("llama", dtype=F32), tmp_path / "ckpt", sharded=False)


@pytest.fixture
def split(tmp_path, src) -> Path:
    dst = tmp_path / "split-4bit"
    compress_checkpoint(src, dst, "4bit", progress=False)
    return dst


def edit_manifest(split: Path, change) -> None:
    path = split / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data["compression"])
    path.write_text(json.dumps(data))


def first_linear(record: dict) -> str:
    return next(k for k, t in record["tensors"].items() if t["mode"] == "linear")


def _scheme_version(c):
    c["scheme"]["version"] = 99


def _scheme_field(c):
    c["scheme"]["sparsity"] = 0.5


def _record_field(c):
    c["codebook"] = "nf4"


def _tensor_mode(c):
    c["tensors"][first_linear(c)]["mode"] = "fused"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param(_scheme_version, "scheme.version", id="scheme-version"),
        pytest.param(_scheme_field, "scheme.sparsity", id="scheme-field"),
        pytest.param(_record_field, "codebook", id="record-field"),
        pytest.param(_tensor_mode, "tensors[{key}].mode", id="tensor-mode"),
    ],
)
@pytest.mark.parametrize("how", ["split-as-model", "layers_path"])
def test_a_manifest_this_version_cannot_read_is_refused_by_field(split, src, change, field, how):
    key = first_linear(json.loads((split / MANIFEST_FILE).read_text())["compression"])
    edit_manifest(split, change)
    field = field.format(key=key)
    with pytest.raises(CompressionSchemeError) as info:
        if how == "layers_path":
            AutoModel.from_pretrained(src, layers_path=split, dtype=F32)
        else:
            AutoModel.from_pretrained(split, dtype=F32)
    assert info.value.field == field
    message = str(info.value)
    assert str(split / MANIFEST_FILE) in message and repr(field) in message, message


def test_a_truncated_compressed_layer_file_is_refused_naming_it(split):
    victim = split / "layer-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(RabbitError) as info:
        AutoModel.from_pretrained(split, dtype=F32)
    assert "layer-00001.safetensors" in str(info.value)


def test_a_record_naming_a_tensor_the_files_lack_is_refused_naming_it(split):
    ghost = "model.layers.0.mlp.ghost_proj.weight"
    edit_manifest(
        split,
        lambda c: c["tensors"].__setitem__(
            ghost, {"dtype": "F32", "shape": [64, 64], "mode": "linear"}
        ),
    )
    with pytest.raises(WeightMismatchError) as info:
        AutoModel.from_pretrained(split, dtype=F32)
    assert repr(ghost) in str(info.value) and "model.layers.0.mlp.ghost_proj.qweight" in str(
        info.value
    )


@pytest.mark.parametrize(
    ("family", "key"),
    [
        pytest.param("llama", "model.layers.1.self_attn.q_proj.weight", id="packed-linear"),
        pytest.param(
            "mixtral", "model.layers.1.block_sparse_moe.experts.0.w1.weight", id="dequantized"
        ),
    ],
)
def test_a_record_whose_shape_disagrees_with_the_stored_tensors_is_refused(tmp_path, family, key):
    """The record doubles a weight's in_features: refused when the model is built, naming the
    file, the tensor and the manifest. (The dequantized expert once loaded, then failed at the
    first token with a bare RuntimeError from a view in the prefetch thread.)"""
    src = save_checkpoint(build_model(family, dtype=F32), tmp_path / "ckpt", sharded=False)
    split = tmp_path / "split"
    compress_checkpoint(src, split, "8bit", progress=False)

    def double(c):
        shape = c["tensors"][key]["shape"]
        shape[-1] *= 2

    edit_manifest(split, double)
    with pytest.raises(WeightMismatchError) as info:
        AutoModel.from_pretrained(split, dtype=F32)
    message = str(info.value)
    assert repr(key) in message and "layer-00001.safetensors" in message, message
    assert str(split / MANIFEST_FILE) in message


@pytest.mark.parametrize(
    ("compression", "layout"),
    [("4bit", "int4pack_cpu:SVE256"), ("8bit", "int8:kn"), ("8bit", "int4pack_cpu:AVX2")],
)
def test_a_packed_layout_this_version_does_not_know_is_refused_at_load(
    src, tmp_path, compression, layout
):
    """Refused when the model is built, not at the first layer read: an unknown 4-bit layout used
    to fail in the prefetch thread at the first token, an unknown 8-bit one was read as int8:nk."""
    split = tmp_path / f"split-{compression}"
    compress_checkpoint(src, split, compression, progress=False)
    edit_manifest(split, lambda c: c.__setitem__("layout", layout))
    with pytest.raises(CompressionSchemeError) as info:
        AutoModel.from_pretrained(split, dtype=F32)
    assert info.value.field == "layout"
    message = str(info.value)
    assert repr(layout) in message and str(split / MANIFEST_FILE) in message, message


def test_compression_with_nothing_compressible_is_a_clear_error(src, cache):
    """Every linear of the tiny model has 64 or 128 input features: none fits 4-bit groups of 256.
    The error names the option and the scheme, and nothing is left in the cache."""
    with pytest.raises(InvalidOptionError) as info:
        AutoModel.from_pretrained(src, dtype=F32, compression="4bit", group_size=256)
    assert info.value.option == "compression"
    assert "4bit-g256" in str(info.value) and "no decoder-layer weight" in str(info.value)
    assert not any(cache.rglob("*.safetensors"))


def test_compression_of_a_compressed_split_is_refused(split, tmp_path):
    with pytest.raises(InvalidOptionError, match="already a compressed split") as info:
        compress_checkpoint(split, tmp_path / "again", "8bit", progress=False)
    assert str(split) in str(info.value)
