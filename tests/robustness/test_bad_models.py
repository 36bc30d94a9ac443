"""AutoModel.from_pretrained on broken models and bad options: a typed RabbitError that names the
file, tensor or option and says what to do, and nothing written (not even the cache directory)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file, save_file  # noqa: E402

from rabbit_engine.errors import UnsupportedModelError, WeightMismatchError  # noqa: E402
from rabbit_store import split_checkpoint  # noqa: E402
from rabbit_store.errors import (  # noqa: E402
    CheckpointNotFoundError,
    InvalidCheckpointError,
    InvalidOptionError,
    RabbitError,
    SplitCorruptedError,
)
from rabbitllm import AutoModel  # noqa: E402

from .conftest import snapshot  # noqa: E402


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RABBITLLM_CACHE inside tmp_path, so that the snapshot sees anything written there too."""
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "rabbit-cache"))
    return tmp_path


def copy_model(tiny_llama: Path, dest: Path) -> Path:
    shutil.copytree(tiny_llama, dest)
    return dest


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def refused(
    source: Path | str, tmp_path: Path, error: type[RabbitError], *says: str, **options
) -> str:
    before = snapshot(tmp_path)
    with pytest.raises(error) as err:
        AutoModel.from_pretrained(source, **options)
    message = str(err.value)
    for fragment in says:
        assert fragment in message, (fragment, message)
    assert snapshot(tmp_path) == before  # nothing written: no cache dir, no temp files
    return message


def test_missing_path(isolated: Path):
    refused(
        isolated / "nope",
        isolated,
        CheckpointNotFoundError,
        "nope",
        "is not a directory",
        "pass the directory",
    )


def test_directory_without_config(isolated: Path, tiny_llama: Path):
    path = copy_model(tiny_llama, isolated / "m")
    (path / "config.json").unlink()
    refused(
        path,
        isolated,
        InvalidCheckpointError,
        str(path),
        "no config.json",
        "point at a model directory",
    )


def test_empty_config(isolated: Path, tiny_llama: Path):
    path = copy_model(tiny_llama, isolated / "m")
    (path / "config.json").write_text("")
    refused(path, isolated, InvalidCheckpointError, "config.json", "not valid JSON", "re-download")


def test_config_without_model_type_or_architectures(isolated: Path, tiny_llama: Path):
    path = copy_model(tiny_llama, isolated / "m")
    edit_config(path, model_type=None, architectures=None)
    refused(
        path,
        isolated,
        InvalidCheckpointError,
        "config.json",
        "neither 'model_type' nor 'architectures'",
    )


def test_unknown_architecture_lists_the_supported_ones(isolated: Path, tiny_llama: Path):
    path = copy_model(tiny_llama, isolated / "m")
    edit_config(path, model_type="mamba9000", architectures=["Mamba9000ForCausalLM"])
    message = refused(
        path,
        isolated,
        UnsupportedModelError,
        "config.json",
        "'mamba9000'",
        "supported model types: ",
        "Upgrade transformers",
        "trust_remote_code=True",
    )
    assert ", llama," in message and ", qwen3," in message


@pytest.mark.parametrize(
    "quant",
    [
        {"quant_method": "awq", "bits": 4, "group_size": 128},
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
    ],
    ids=lambda q: q["quant_method"],
)
def test_prequantized_checkpoint_is_refused_by_method(isolated: Path, tiny_llama: Path, quant):
    """Packed integers and scales would be read as weights: refused by name, before any weight is
    read (fp8, which streams, is tested in tests/engine/test_prequantized.py)."""
    path = copy_model(tiny_llama, isolated / "m")
    edit_config(path, quantization_config=quant)
    refused(
        path,
        isolated,
        UnsupportedModelError,
        "config.json",
        f"quant_method={quant['quant_method']!r}",
        "pre-quantized",
    )


def test_architecture_without_a_causal_lm_lists_the_supported_ones(
    isolated: Path, tiny_llama: Path
):
    path = copy_model(tiny_llama, isolated / "m")
    edit_config(path, model_type="vit", architectures=["ViTModel"])
    message = refused(
        path, isolated, UnsupportedModelError, "model_type='vit'", "supported model types: "
    )
    assert ", llama," in message


def test_tensor_shape_not_what_the_config_implies(isolated: Path, tiny_llama: Path):
    path = copy_model(tiny_llama, isolated / "m")
    edit_config(path, intermediate_size=48)
    message = refused(
        path,
        isolated,
        WeightMismatchError,
        "model.safetensors: tensor 'model.layers.0.mlp.",
        "but the config implies",
        "Is config.json the one this checkpoint was saved with?",
    )
    assert (
        "[16, 32]" in message and "[16, 48]" in message
    )  # down_proj: what is there, what the config wants


def test_layer_with_a_missing_tensor(isolated: Path, tiny_llama: Path):
    path = copy_model(tiny_llama, isolated / "m")
    edit_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    refused(
        path,
        isolated,
        WeightMismatchError,
        "'model.layers.1.self_attn.k_proj.weight'",
        "layer 1",
        "incomplete",
    )


def test_extra_tensors_are_a_warning(
    isolated: Path, tiny_llama: Path, caplog: pytest.LogCaptureFixture
):
    import numpy as np

    path = copy_model(tiny_llama, isolated / "m")
    edit_weights(
        path, lambda t: t.update({"model.layers.0.surprise.weight": np.ones(4, dtype=np.float32)})
    )
    with caplog.at_level("WARNING"):
        model = AutoModel.from_pretrained(path)
    model.close()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model.layers.0.surprise.weight" in m for m in warned), warned


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ({"device": "tpu"}, ("device='tpu'", "'cpu' or 'cuda[:N]'")),
        ({"device": "cuda:7"}, ("device='cuda:7'",)),
        ({"device": "not a device"}, ("device='not a device'", "'cpu' or 'cuda[:N]'")),
        ({"dtype": "float8"}, ("dtype='float8'", "'auto'")),
        ({"max_memory": "lots"}, ("max_memory='lots'", "'6GiB'")),
        ({"max_memory": "-5GB"}, ("max_memory='-5GB'",)),
        ({"frobnicate": 1}, ("frobnicate",)),
    ],
    ids=lambda v: str(v),
)
def test_bad_options(isolated: Path, tiny_llama: Path, option: dict, says: tuple[str, ...]):
    if option.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("eight GPUs here")
    refused(tiny_llama, isolated, InvalidOptionError, *says, **option)


# ---- a split corrupted after the split: size and header always, sha256 with verify=True ----------
@pytest.fixture
def split_llama(isolated: Path, tiny_llama: Path) -> Path:
    dest = isolated / "split"
    split_checkpoint(tiny_llama, dest, progress=False)
    return dest


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_data_byte_is_caught_with_verify(
    isolated: Path, split_llama: Path, tiny_llama: Path
):
    flip(split_llama / "layer-00001.safetensors", -3)  # inside the last tensor's data
    AutoModel.from_pretrained(
        split_llama
    ).close()  # sizes and headers are fine: loads without verify
    message = refused(
        split_llama,
        isolated,
        SplitCorruptedError,
        "layer-00001.safetensors",
        "sha256",
        "rabbit-store verify",
        verify=True,
    )
    assert "layer-00000" not in message
    # the same through layers_path (config from the original, weights from the split)
    refused(
        tiny_llama,
        isolated,
        SplitCorruptedError,
        "layer-00001.safetensors",
        layers_path=split_llama,
        verify=True,
    )


@pytest.mark.parametrize("damage", ["header byte", "truncated"])
def test_damaged_header_or_size_is_always_caught(
    isolated: Path, split_llama: Path, tiny_llama: Path, damage: str
):
    victim = split_llama / "layer-00000.safetensors"
    if damage == "header byte":
        header = victim.read_bytes()[:200]
        flip(victim, header.index(b'"pt"') + 2)  # "pt" -> "pu": still valid JSON, same tensors
    else:
        victim.write_bytes(victim.read_bytes()[:-1])
    refused(
        split_llama,
        isolated,
        SplitCorruptedError,
        "layer-00000.safetensors",
        "split the checkpoint again",
    )
    refused(
        tiny_llama,
        isolated,
        SplitCorruptedError,
        "layer-00000.safetensors",
        layers_path=split_llama,
    )
