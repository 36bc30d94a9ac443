"""Compressed streaming against its oracle: transformers' own model, fake-quantized.

For each core family (FamilySpec.required, MoE included), sharded and single-file: RabbitLLM loads
the tiny fp32 checkpoint with `compression=`, which writes a compressed split into the cache and
streams it (linears on torch's packed int8/int4 kernels, expert stacks dequantized in the prefetch
thread). The oracle quantizes the same checkpoint tensors with the same scheme, dequantizes them
back to float32, saves them under their original names and loads that with transformers'
`from_pretrained` (its converters stack the experts): the model RabbitLLM claims to compute.

Tolerance: both sides compute in float32 with the same effective weights ((code - 8) * scale +
zero, or q * scale, exact in fp32); what differs is the order of the fp32 accumulation (the packed
kernels block the reduction differently from oneDNN's sgemm) and where the weights sit in memory.
Each of those is a few ulps per dot product; through 2-4 layers of a 64-wide model they stay under
1e-4 relative to the logits' magnitude (measured: at most ~2e-6), so 1e-4 catches a wrong scale,
group or layout (which moves logits by O(1)) with a wide margin and never trips on rounding.
Greedy tokens must be identical.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

from rabbit_engine.quant import dequantize, quantize
from rabbit_engine.quant.linear import CompressedLinear
from rabbit_engine.weights import RESIDENT
from rabbit_store import CheckpointIndex, open_source
from rabbitllm import AutoModel
from tests.models.families import FAMILIES, PAD_ID, VOCAB, build_model, save_checkpoint

CORE = sorted(f for f, spec in FAMILIES.items() if spec.required)
PROMPT_LEN = 16
REL_TOL = 1e-4
# fp32 sources: int8 weights are 1/4 of fp32, int4 1/8, plus scales and what stays uncompressed
# (norms, routers, shapes the scheme cannot pack).
MAX_READ_RATIO = {"8bit": 0.40, "4bit": 0.30}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One RABBITLLM_CACHE for the module: each checkpoint is compressed there once."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("rabbit-cache")
        mp.setenv("RABBITLLM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            ref = build_model(family, dtype=torch.float32, seed=0)
            root = tmp_path_factory.mktemp(family)
            made[family] = (
                save_checkpoint(ref, root / "sharded", sharded=True),
                save_checkpoint(ref, root / "single", sharded=False),
            )
        return made[family]

    return get


def fake_quantized(checkpoint: Path, record, dest: Path) -> torch.nn.Module:
    """transformers' own model over the checkpoint with each recorded tensor quantized and
    dequantized back: the weights the compressed model computes with."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(file))
    for key in record.tensors:
        original = tensors[key]
        tensors[key] = dequantize(quantize(original, record.scheme, name=key), dtype=original.dtype)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, dest / name)
    return AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()


def _close(expected: torch.Tensor, got: torch.Tensor) -> tuple[bool, float]:
    diff = (expected - got).abs().max().item()
    return diff <= REL_TOL * max(1.0, expected.abs().max().item()), diff


def _prompt() -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def _check(family: str, path: Path, compression: str, tmp_path: Path) -> None:
    with AutoModel.from_pretrained(path, dtype=torch.float32, compression=compression) as model:
        weight_map = model._rabbit_streamer.weight_map
        compressed = weight_map.compressed
        assert compressed is not None
        record = compressed.record
        assert record.scheme.bits == (8 if compression == "8bit" else 4)
        # What streams is the compressed split in the cache, never the original files.
        assert Path(model._rabbit_streamer.reader.source.location).is_relative_to(
            Path(weight_map.index.source.location)
        )
        assert "compressed" in weight_map.index.source.location
        packed = [m for m in model.modules() if isinstance(m, CompressedLinear)]
        assert packed and len(packed) == len(compressed.swapped)
        linear_keys = [k for k, t in record.tensors.items() if t.mode == "linear"]
        assert len(compressed.swapped) == len(linear_keys), "a packed linear runs dequantized"
        # Bytes read per token: the layers' compressed bytes, a fraction of the fp32 original's.
        original = CheckpointIndex.load(open_source(path))
        resident = weight_map.nbytes(RESIDENT)
        streamed = sum(weight_map.nbytes(g) for g in weight_map.groups if g != RESIDENT)
        ratio = streamed / (original.nbytes - resident)
        assert ratio <= MAX_READ_RATIO[compression], f"layers read {ratio:.3f} of their fp32 bytes"
        fake = fake_quantized(path, record, tmp_path / "fake")
        ids = _prompt()
        with torch.no_grad():
            cache_ref, cache_rab = (
                DynamicCache(config=fake.config),
                DynamicCache(config=fake.config),
            )
            out_ref = fake(ids, past_key_values=cache_ref, use_cache=True)
            out_rab = model(ids, past_key_values=cache_rab, use_cache=True)
            ok, diff = _close(out_ref.logits, out_rab.logits)
            assert ok, f"prompt logits differ by {diff}"
            token = out_ref.logits[:, -1:].argmax(-1)
            for step in range(6):
                out_ref = fake(token, past_key_values=cache_ref, use_cache=True)
                out_rab = model(token, past_key_values=cache_rab, use_cache=True)
                ok, diff = _close(out_ref.logits, out_rab.logits)
                assert ok, f"decode step {step}: logits differ by {diff}"
                token = out_ref.logits[:, -1:].argmax(-1)
            kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD_ID)
            expected = fake.generate(ids, **kwargs)
            got = model.generate(ids, **kwargs)
        assert torch.equal(expected, got), f"greedy tokens differ:\n{expected}\n{got}"


@pytest.mark.parametrize("family", CORE)
@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_compressed_streaming_matches_fake_quantized_transformers(
    family, compression, checkpoints, cache_dir, tmp_path
):
    sharded, single = checkpoints(family)
    # Both layouts of the source checkpoint: each is compressed into its own cache entry.
    _check(family, sharded, compression, tmp_path / "sharded")
    _check(family, single, compression, tmp_path / "single")
