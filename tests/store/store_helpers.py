"""Helpers of the rabbit-store tests: checkpoints written with safetensors.numpy, a hub cache laid
out on disk, safe_open comparisons. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN = 8
VOCAB = 32


def layer_tensors(prefix: str, i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One decoder layer with mixed dtypes (f32 norms, f16 projections, an int8 tensor)."""
    p = f"{prefix}.{i}"
    return {
        f"{p}.input_layernorm.weight": rng.standard_normal(HIDDEN).astype(np.float32),
        f"{p}.self_attn.q_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float16),
        f"{p}.self_attn.k_proj.weight": rng.standard_normal((HIDDEN // 2, HIDDEN)).astype(
            np.float16
        ),
        f"{p}.self_attn.o_proj.bias": rng.standard_normal(3).astype(np.float16),  # odd byte count
        f"{p}.mlp.down_proj.weight": rng.standard_normal((HIDDEN, 2 * HIDDEN)).astype(np.float32),
        f"{p}.mlp.gate.qweight": rng.integers(-100, 100, (5, 3), dtype=np.int8),
    }


def model_tensors(
    layout: str = "llama", num_layers: int = 3, tied: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if layout == "llama":
        prefix, embed, norm = "model.layers", "model.embed_tokens.weight", "model.norm.weight"
    elif layout == "gpt2":
        prefix, embed, norm = "transformer.h", "transformer.wte.weight", "transformer.ln_f.weight"
    else:
        raise ValueError(layout)
    tensors = {embed: rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)}
    for i in range(num_layers):
        tensors.update(layer_tensors(prefix, i, rng))
    tensors[norm] = rng.standard_normal(HIDDEN).astype(np.float32)
    if layout == "gpt2":
        tensors["transformer.wpe.weight"] = rng.standard_normal((16, HIDDEN)).astype(np.float32)
    if not tied:
        tensors["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    return tensors


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, np.ndarray]
    shards: dict[str, list[str]]  # file -> tensor names


def write_checkpoint(
    path: Path,
    tensors: dict[str, np.ndarray],
    shards: dict[str, list[str]] | None = None,
    *,
    config: bool = True,
) -> Checkpoint:
    """A single model.safetensors (shards=None) or shards + model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    if shards is None:
        shards = {"model.safetensors": list(tensors)}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        assert sorted(n for names in shards.values() for n in names) == sorted(tensors)
        for file, names in shards.items():
            (path / file).parent.mkdir(parents=True, exist_ok=True)
            save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map = {n: f for f, names in shards.items() for n in names}
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": weight_map,
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if config:
        (path / "config.json").write_text(
            json.dumps({"model_type": "llama", "num_hidden_layers": 3})
        )
        (path / "tokenizer_config.json").write_text("{}")
        (path / "README.md").write_text("not copied by split\n")
    return Checkpoint(path, tensors, shards)


def odd_shards(tensors: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Odd shard names; layer 1's tensors spread over the first and last shard, not consecutive."""
    names = list(tensors)
    shards: dict[str, list[str]] = {
        "weights-a.safetensors": [],
        "part_7.bin.safetensors": [],
        "zz/last.safetensors": [],
    }
    for name in names:
        if ".1." in name:
            shards["weights-a.safetensors" if "attn" in name else "zz/last.safetensors"].append(
                name
            )
        elif ".2." in name or "norm.weight" in name or "lm_head" in name:
            shards["zz/last.safetensors"].append(name)
        elif ".0." in name or "embed" in name:
            shards["weights-a.safetensors"].append(name)
        else:
            shards["part_7.bin.safetensors"].append(name)
    return {f: n for f, n in shards.items() if n}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upload(fs, local: Path, url: str) -> None:
    for file in local.rglob("*"):
        if file.is_file():
            fs.put_file(str(file), f"{url}/{file.relative_to(local).as_posix()}")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(
    cache: Path, repo_id: str, checkpoint: Path, commit: str = COMMIT, ref: str = "main"
) -> Path:
    """Lay `checkpoint` out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<file>
    symlinks, refs/<ref>. Returns the snapshot folder."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for file in checkpoint.rglob("*"):
        if not file.is_file():
            continue
        blob = repo_dir / "blobs" / sha256_file(file)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of every .safetensors file under `path` (numpy, via safe_open)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for file in sorted(path.rglob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            for key in handle.keys():
                assert key not in out, f"{key} twice"
                out[key] = handle.get_tensor(key)
    return out
