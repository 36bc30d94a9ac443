"""The checkpoint a bench measures: a Llama-shaped random one in bf16, sharded like the hub's and
cached between runs, and the facts the floors and bounds need (through rabbit_store, torch-free)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rabbit_store import CheckpointIndex, LayerPlan, open_source

SHARD_BYTES = 500 * 10**6  # hub-like shards (layers straddle shard boundaries)


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 20
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4
    seed: int = 0

    @property
    def key(self) -> str:
        return (
            f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-v{self.vocab}"
            f"-a{self.heads}-kv{self.kv_heads}-s{self.seed}"
        )

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def resident_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden  # embeddings, lm_head, final norm

    def nbytes(self) -> int:
        return 2 * (self.layers * self.layer_params() + self.resident_params())


def shape_for_size(size_gb: float, **widths) -> Shape:
    """Pick the layer count that brings a model of these widths closest to `size_gb` (1e9 bytes)."""
    probe = Shape(layers=1, **widths)
    per_layer = 2 * probe.layer_params()
    layers = max(1, round((size_gb * 1e9 - 2 * probe.resident_params()) / per_layer))
    return Shape(layers=layers, **widths)


QUICK = Shape(hidden=128, layers=4, intermediate=352, vocab=1024, heads=4, kv_heads=2)


def llama_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def checkpoint_plan(path: Path) -> LayerPlan:
    """The engine's own reading of the checkpoint: its shards' headers and its decoder layers."""
    return LayerPlan.from_index(CheckpointIndex.load(open_source(str(path))))


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (the shards its index names, or the single file)."""
    return [Path(path) / name for name in CheckpointIndex.load(open_source(str(path))).files]


def layer_facts(path: Path) -> dict:
    """Byte counts the floors and the streaming memory bound are computed from."""
    plan = checkpoint_plan(path)
    layers = plan.layer_nbytes
    total = plan.index.nbytes
    return {
        "layer_bytes": sum(layers),
        "largest_layer": max(layers, default=0),
        "num_layers": plan.num_layers,
        "resident_bytes": total - sum(layers),
        "total_bytes": total,
        "layer_sizes": layers,
    }


def make_checkpoint(
    shape: Shape, root: Path, *, fresh: bool = False, log: Callable[[str], object] = print
) -> Path:
    """Write (or reuse) the checkpoint under `root/shape.key`; returns its directory."""
    import torch
    from safetensors.torch import save_file

    path = root / shape.key
    done = path / ".bench-done"
    if done.exists() and not fresh:
        return path
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    config = llama_config(shape)
    config.save_pretrained(path)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        skeleton = LlamaForCausalLM(config)
    names = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
    gen = torch.Generator().manual_seed(shape.seed)
    total = sum(2 * _numel(s) for _, s in names)
    log(f"writing a random {total / 1e9:.2f} GB bf16 checkpoint to {path} ...")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    flushed: list[str] = []
    shard_bytes = min(SHARD_BYTES, max(total // 3, 1))  # tiny models get shards too
    n_shards = max(1, -(-total // shard_bytes))

    def flush() -> None:
        name = f"model-{len(flushed) + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shards[0], str(path / name), metadata={"format": "pt"})
        for key in shards[0]:
            weight_map[key] = name
        flushed.append(name)
        shards[0] = {}

    for key, s in names:
        if key.endswith("norm.weight"):
            tensor = torch.ones(s, dtype=torch.bfloat16)
        else:
            std = 1.0 if "embed_tokens" in key else 0.02
            tensor = (torch.randn(s, generator=gen) * std).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if size and size + nbytes > shard_bytes and len(flushed) < n_shards - 1:
            flush()
            size = 0
        shards[0][key] = tensor
        size += nbytes
    flush()
    # The shard count in names must be the real one.
    if len(flushed) != n_shards:
        for i, name in enumerate(flushed):
            new = f"model-{i + 1:05d}-of-{len(flushed):05d}.safetensors"
            os.replace(path / name, path / new)
            for k, v in list(weight_map.items()):
                if v == name:
                    weight_map[k] = new
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "bench-shape.json").write_text(json.dumps(asdict(shape)))
    for f in checkpoint_files(path):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    done.write_text("ok\n")
    return path


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
