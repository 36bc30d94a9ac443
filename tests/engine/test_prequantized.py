"""Checkpoints saved already quantized: fp8, MXFP4 and weight-only compressed-tensors stream
through transformers' own quantizer (dequantized as each layer loads); every other method, and
what transformers cannot run here, is refused by name before any weight is read.

The fp8 checkpoints are written here the way fine-grained fp8 checkpoints (DeepSeek-V3, Qwen3 FP8)
store their linears: the weight as float8_e4m3fn and one float32 `weight_scale_inv` per block of
the block size the config declares. transformers needs no GPU to load them (it dequantizes), so its
own `from_pretrained` is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rabbit_engine.errors import UnsupportedModelError, WeightMismatchError
from rabbit_store.errors import InvalidCheckpointError, InvalidOptionError
from rabbitllm import AutoModel
from tests.models.families import build_model, save_checkpoint

BLOCK = 16  # the tiny families' dims are multiples of 16; real checkpoints use 128
FP8_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [BLOCK, BLOCK],
}


def _fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, per-block scale) with weight ~= fp8 * scale, block by block."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    quantized = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return quantized, scale


def _quantize_file(file: Path) -> dict[str, str]:
    """Rewrite one shard with its decoder linears in fp8; returns {new scale key: file name}."""
    tensors = load_file(file)
    out: dict[str, torch.Tensor] = {}
    added: dict[str, str] = {}
    for key, tensor in tensors.items():
        if ".layers." in key and key.endswith("proj.weight") and tensor.ndim == 2:
            out[key], scale = _fp8_blocks(tensor)
            scale_key = key.removesuffix("weight") + "weight_scale_inv"
            out[scale_key] = scale
            added[scale_key] = file.name
        else:
            out[key] = tensor
    file.unlink()
    save_file(out, file, metadata={"format": "pt"})
    return added


def write_fp8_checkpoint(model, path: Path, *, sharded: bool) -> Path:
    """save_pretrained, then every decoder-layer linear stored fp8 with block scales."""
    save_checkpoint(model, path, sharded=sharded)
    added: dict[str, str] = {}
    for file in sorted(path.glob("*.safetensors")):
        added.update(_quantize_file(file))
    assert added, "no linear was quantized"
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update(added)
        index.write_text(json.dumps(data))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = FP8_CONFIG
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def fp8_llama(tmp_path_factory):
    model = build_model("llama", dtype=torch.bfloat16, seed=0)
    return write_fp8_checkpoint(model, tmp_path_factory.mktemp("fp8") / "ckpt", sharded=True)


def _oracle(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _check_against_transformers(path: Path) -> None:
    """Same logits, bit for bit, and the same greedy tokens as transformers' own loading; where
    transformers' own loading cannot run the fp8 quantizer (5.0 imports triton, a GPU compiler,
    even to dequantize on a CPU), a clear refusal naming the method instead of a traceback.

    Exact, not within a tolerance: both sides dequantize the same fp8 bytes with the same
    transformers op (`Fp8Dequantize`) into the same dtype, and streaming an unquantized checkpoint
    is already bit-identical to transformers; any difference is a loading bug."""
    try:
        ref = _oracle(path)
    except ImportError as exc:
        with pytest.raises(UnsupportedModelError) as info:
            AutoModel.from_pretrained(path)
        message = str(info.value)
        method = json.loads((path / "config.json").read_text())["quantization_config"]
        assert f"quant_method={method['quant_method']!r}" in message, message
        assert str(exc) in message, message
        return
    ids = torch.randint(3, 200, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    tokens = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with AutoModel.from_pretrained(path) as model:
        assert model.dtype == ref.dtype
        with torch.no_grad():
            got = model(ids).logits
        assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()
        assert torch.equal(
            model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), tokens
        )


def test_fp8_checkpoint_streams_like_transformers_dequantizes_it(fp8_llama: Path):
    _check_against_transformers(fp8_llama)


def test_fp8_weights_are_dequantized_not_read_as_bf16(fp8_llama: Path):
    """The packed fp8 bytes must become scale * value: reading them as the weights (what the
    engine did before it ran the quantizer) gives weights off by the block scales."""
    try:
        ref = _oracle(fp8_llama)
    except ImportError:
        _check_against_transformers(fp8_llama)  # this transformers cannot: refused, checked there
        return
    expected = ref.model.layers[1].mlp.down_proj.weight
    with AutoModel.from_pretrained(fp8_llama, prefetch=0) as model:
        seen: list[torch.Tensor] = []
        layer = model._rabbit_streamer.weight_map.model.model.layers[1]
        hook = layer.register_forward_pre_hook(
            lambda mod, args: seen.append(mod.mlp.down_proj.weight.detach().clone())
        )
        model(torch.tensor([[5, 6, 7]]))
        hook.remove()
    assert len(seen) == 1 and seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], expected)


def test_fp8_single_file_checkpoint(tmp_path: Path):
    model = build_model("llama", dtype=torch.bfloat16, seed=1)
    path = write_fp8_checkpoint(model, tmp_path / "ckpt", sharded=False)
    assert (path / "model.safetensors").exists()
    _check_against_transformers(path)


def test_fp8_plain_split_streams_as_layers_path(fp8_llama: Path, tmp_path: Path):
    """`rabbit split` copies the fp8 tensors and their scales into the layer files as they are."""
    from rabbit_store.split.splitter import split_checkpoint

    split_checkpoint(fp8_llama, tmp_path / "split", progress=False)
    try:
        ref = _oracle(fp8_llama)
    except ImportError:
        _check_against_transformers(fp8_llama)  # this transformers cannot: refused, checked there
        return
    ids = torch.tensor([[5, 6, 7, 8]])
    with AutoModel.from_pretrained(fp8_llama, layers_path=tmp_path / "split") as model:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("method", ["fp8", "mxfp4"])
def test_compression_of_a_prequantized_checkpoint_is_refused(
    fp8_llama: Path, tmp_path, monkeypatch, method
):
    """Compressing reads every linear weight as a float weight: a pre-quantized checkpoint's are
    not, so `compression=` is refused before anything is written, naming config.json (the
    engine also refuses a compressed split of one, below, whatever wrote it)."""
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "cache"))
    if method == "fp8":
        path = fp8_llama
    else:
        model = build_model("gpt_oss", dtype=torch.bfloat16, seed=0)
        path = write_mxfp4_checkpoint(model, tmp_path / "ckpt", sharded=False)
    # Where this transformers cannot run the quantizer at all (fp8 on 5.0 needs triton), that
    # refusal, naming config.json, comes first; otherwise compression= itself is refused.
    with pytest.raises((InvalidOptionError, UnsupportedModelError), match="config.json") as info:
        AutoModel.from_pretrained(path, compression="8bit")
    if isinstance(info.value, InvalidOptionError):
        assert info.value.option == "compression"
        assert "has a quantization_config" in str(info.value)
    assert not (tmp_path / "cache" / "compressed").exists() or not any(
        (tmp_path / "cache" / "compressed").iterdir()
    )


def test_tensors_the_quantization_config_does_not_describe_are_refused(fp8_llama, tmp_path):
    """fp8 tensors under an MXFP4 config: its conversions would load the fp8 weights (cast) and
    ignore their `weight_scale_inv`, giving unscaled weights without an error."""
    import shutil

    path = Path(shutil.copytree(fp8_llama, tmp_path / "ckpt"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError) as info:
        AutoModel.from_pretrained(path)
    message = str(info.value)
    assert "quant_method='mxfp4'" in message and "weight_scale_inv" in message
    assert ".safetensors" in message and "config.json" in message


def test_a_compressed_split_of_a_prequantized_checkpoint_is_refused():
    """The engine's own guard, whatever wrote the split: its numbers would be wrong."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from rabbit_engine.prequantized import attach_quantizer

    config = AutoConfig.for_model("llama", quantization_config=FP8_CONFIG)
    index = SimpleNamespace(
        manifest=SimpleNamespace(compression={"scheme": {"bits": 8}}),
        source=SimpleNamespace(location="dst"),
    )
    with pytest.raises(UnsupportedModelError, match="^dst: a compressed split of a pre-quantized"):
        attach_quantizer(None, config, location="src", index=index)


def test_fp8_moe_experts_are_dequantized_before_transformers_merges_them(tmp_path: Path):
    """Per-expert fp8 linears (Qwen3-MoE FP8's layout): transformers dequantizes each expert
    before its converter fuses them into the 3-D experts tensor."""
    model = build_model("qwen3_moe", dtype=torch.bfloat16, seed=0)
    path = write_fp8_checkpoint(model, tmp_path / "ckpt", sharded=True)
    keys = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.0." in k and k.endswith("weight_scale_inv") for k in keys)
    _check_against_transformers(path)


def write_mxfp4_checkpoint(model, path: Path, *, sharded: bool) -> Path:
    """gpt-oss as released: every expert tensor stored MXFP4, as `*_blocks` (two fp4 values a
    byte, 16 bytes per block of 32 inputs) and `*_scales` (the blocks' power-of-two exponent, +127).

    The codes are random, not a quantization of the model's weights: any byte is a valid pair of
    fp4 codes, and the test only needs both loaders to dequantize the same bytes."""
    save_checkpoint(model, path, sharded=sharded)
    generator = torch.Generator().manual_seed(0)
    added: dict[str, str] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for key in [
            k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))
        ]:
            experts, inputs, outputs = tensors.pop(key).shape  # the model's [E, in, out]
            shape = (experts, outputs, inputs // 32)
            tensors[key + "_blocks"] = torch.randint(
                0, 256, (*shape, 16), dtype=torch.uint8, generator=generator
            )
            tensors[key + "_scales"] = torch.randint(
                120, 125, shape, dtype=torch.uint8, generator=generator
            )
            added.update({key + "_blocks": file.name, key + "_scales": file.name})
        file.unlink()
        save_file(tensors, file, metadata={"format": "pt"})
    assert added, "no expert tensor was quantized"
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            k: v for k, v in data["weight_map"].items() if k + "_blocks" not in added
        }
        data["weight_map"].update(added)
        index.write_text(json.dumps(data))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single-file"])
def test_mxfp4_gpt_oss_streams_like_transformers_dequantizes_it(tmp_path: Path, sharded: bool):
    model = build_model("gpt_oss", dtype=torch.bfloat16, seed=0)
    path = write_mxfp4_checkpoint(model, tmp_path / "ckpt", sharded=sharded)
    _check_against_transformers(path)


def write_compressed_tensors_checkpoint(model, path: Path, fmt: str, *, sharded: bool) -> Path:
    """A weight-only compressed-tensors checkpoint as llm-compressor writes one, made with
    compressed-tensors' own API: its quantization config applied to every Linear but the head,
    absmax scales (any valid scales do: both loaders dequantize the same bytes), then its
    compressor packs the weights and writes the `quantization_config`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    args = {
        "pack-quantized": QuantizationArgs(num_bits=4, strategy="group", group_size=BLOCK * 2),
        "int-quantized": QuantizationArgs(num_bits=8, strategy="channel"),
        "float-quantized": QuantizationArgs(num_bits=8, type="float", strategy="channel"),
    }[fmt]
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
        format=fmt,
    )
    apply_quantization_config(model, config, show_progress=False)
    top = 7.0 if args.num_bits == 4 else 127.0
    if args.type == "float":
        top = torch.finfo(torch.float8_e4m3fn).max
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            weight = module.weight.float()
            if args.group_size:
                weight = weight.reshape(weight.shape[0], -1, args.group_size)
            scale = weight.abs().amax(-1) / top
            module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(
                module.weight_scale.dtype
            )
            module.quantization_status = QuantizationStatus.CALIBRATION
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    save_checkpoint(model, path, sharded=sharded)
    compressor.update_config(path)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == fmt
    return path


@pytest.mark.parametrize(
    ("fmt", "sharded"),
    [("pack-quantized", True), ("pack-quantized", False), ("int-quantized", True)]
    + [("float-quantized", True)],
    ids=["w4a16-sharded", "w4a16-single-file", "w8a16", "fp8-weights"],
)
def test_compressed_tensors_weight_only_streams_like_transformers(tmp_path, fmt, sharded):
    """transformers' own loading keeps compressed-tensors' modules and decompresses them on the
    first forward; streaming dequantizes each layer with transformers' `CompressedTensorsDequantize`
    as it loads. Both decompress the same bytes with compressed-tensors' own code."""
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    model = build_model("llama", dtype=torch.bfloat16, seed=0)
    path = write_compressed_tensors_checkpoint(model, tmp_path / "ckpt", fmt, sharded=sharded)
    load_operations = getattr(CompressedTensorsHfQuantizer, "get_load_operations", None)
    if load_operations is None or "dequantize" not in load_operations(None):
        # An older transformers (5.0) only runs compressed-tensors' own modules, which the
        # streaming engine does not swap in and out: refused, saying what would work.
        with pytest.raises(UnsupportedModelError, match="no load-time dequantization"):
            AutoModel.from_pretrained(path)
        return
    _check_against_transformers(path)


def test_compressed_tensors_with_activation_quantization_is_refused(tmp_path, monkeypatch):
    """W8A8 quantizes activations in compressed-tensors' modules: dequantized weights alone would
    give other numbers than transformers, silently."""
    quant = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "dynamic": True},
            }
        },
    }
    message = _refusal(_with_quantization(tmp_path, quant), UnsupportedModelError, monkeypatch)
    assert "config_groups.group_0.input_activations quantizes activations" in message
    assert "weight-only" in message


def test_a_quantizer_that_cannot_run_here_is_named(tmp_path, monkeypatch):
    """compressed-tensors checkpoints need the compressed-tensors package: without it the error
    says so (transformers' own words), naming the method, before any weight is read."""
    import transformers.quantizers.quantizer_compressed_tensors as ct

    monkeypatch.setattr(ct, "is_compressed_tensors_available", lambda: False)
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}
    message = _refusal(_with_quantization(tmp_path, quant), UnsupportedModelError, monkeypatch)
    assert "quant_method='compressed-tensors'" in message and "does not run here" in message
    assert "pip install compressed-tensors" in message


# --- refused ----------------------------------------------------------------------------------


def _with_quantization(tmp_path: Path, quant) -> Path:
    model = build_model("llama", dtype=torch.bfloat16, seed=0)
    path = save_checkpoint(model, tmp_path / "ckpt", sharded=False)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    return path


def _refusal(path: Path, error: type[Exception], monkeypatch) -> str:
    """The error, raised before any weight is read (reading one fails the test)."""
    from rabbit_store import LayerReader

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(LayerReader, "read", no_reads)
    with pytest.raises(error) as info:
        AutoModel.from_pretrained(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("quant", "needs"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptqmodel"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, "kernels"),
        ({"load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "hqq", "nbits": 4}, "hqq"),
        ({"quant_method": "some-new-method"}, "not run by this engine"),
    ],
    ids=["gptq", "awq", "bnb-without-method", "hqq", "unknown"],
)
def test_other_methods_are_refused_by_name(tmp_path: Path, monkeypatch, quant, needs):
    message = _refusal(_with_quantization(tmp_path, quant), UnsupportedModelError, monkeypatch)
    method = quant.get("quant_method", "bitsandbytes")
    assert f"quant_method={method!r}" in message
    assert "config.json" in message and "pre-quantized" in message and needs in message
    assert "fp8, mxfp4, compressed-tensors" in message  # what does stream


@pytest.mark.parametrize(
    ("quant", "fault"),
    [
        ("fp8", "not a JSON object"),
        ({"bits": 4}, "no 'quant_method'"),
        ({**FP8_CONFIG, "weight_block_size": [16]}, "malformed"),
        ({**FP8_CONFIG, "activation_scheme": "sometimes"}, "malformed"),
    ],
    ids=["not-a-dict", "no-method", "block-size", "activation-scheme"],
)
def test_malformed_quantization_config_names_the_field(tmp_path: Path, monkeypatch, quant, fault):
    message = _refusal(_with_quantization(tmp_path, quant), InvalidCheckpointError, monkeypatch)
    assert "config.json: quantization_config" in message and fault in message


def test_quantization_config_of_a_text_sub_config_is_found():
    from rabbit_engine.prequantized import check_prequantized

    data = {"model_type": "llava", "text_config": {"model_type": "llama"}}
    check_prequantized("m", data)  # none: nothing to refuse
    data["text_config"]["quantization_config"] = {"quant_method": "gptq"}
    with pytest.raises(UnsupportedModelError, match="quant_method='gptq'"):
        check_prequantized("m", data)
