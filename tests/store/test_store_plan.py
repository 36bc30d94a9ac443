"""LayerPlan: prefix inference, grouping from the index, completeness, tied heads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rabbit_store import CheckpointIndex, LayerPlan, TensorInfo, open_source
from rabbit_store.errors import IncompleteLayerError, LayerLayoutError
from rabbit_store.plan import infer_layer_prefix

from .store_helpers import Checkpoint


def fake_index(names: list[str]) -> CheckpointIndex:
    tensors = {n: TensorInfo(n, "f", "F32", (2,), 8 * i, 8) for i, n in enumerate(names)}
    return CheckpointIndex(source=SimpleNamespace(location="mem://m"), tensors=tensors, files=["f"])


def layered(prefix: str, count: int, extra: list[str]) -> list[str]:
    return [
        f"{prefix}.{i}.{p}.weight" for i in range(count) for p in ("attn.q", "mlp.up", "ln")
    ] + extra


@pytest.mark.parametrize(
    ("prefix", "embeddings", "norm", "head"),
    [
        ("model.layers", ["model.embed_tokens.weight"], ["model.norm.weight"], ["lm_head.weight"]),
        (
            "transformer.h",
            ["transformer.wte.weight", "transformer.wpe.weight"],
            ["transformer.ln_f.weight", "transformer.ln_f.bias"],
            [],
        ),
        (
            "transformer.encoder.layers",
            ["transformer.embedding.word_embeddings.weight"],
            ["transformer.encoder.final_layernorm.weight"],
            ["transformer.output_layer.weight"],
        ),
        (
            "model.language_model.layers",
            ["model.language_model.embed_tokens.weight"],
            ["model.language_model.norm.weight"],
            ["lm_head.weight"],
        ),
        (
            "gpt_neox.layers",
            ["gpt_neox.embed_in.weight"],
            ["gpt_neox.final_layer_norm.weight"],
            ["embed_out.weight"],
        ),
    ],
)
def test_layouts(prefix, embeddings, norm, head):
    other = [
        "model.vision_tower.encoder.layers.0.mlp.weight",
        "model.vision_tower.post_layernorm.weight",
    ]
    names = layered(prefix, 3, embeddings + norm + head + other)
    plan = LayerPlan.from_index(fake_index(names))
    assert plan.layer_prefix == prefix
    assert plan.num_layers == 3
    assert plan.layers[1] == [f"{prefix}.1.{p}.weight" for p in ("attn.q", "mlp.up", "ln")]
    assert plan.embeddings == embeddings and plan.norm == norm and plan.lm_head == head
    assert plan.other == other
    assert plan.tied is (not head)
    assert plan.nbytes(plan.layers[0]) == 24 and plan.layer_nbytes == [24, 24, 24]
    parts = [g[0] for g in plan.groups()]
    assert parts[0] == "embeddings" and parts.count("layer") == 3 and parts[-1] == "other"


def test_layers_sorted_numerically_and_grouped_across_shards(sharded: Checkpoint):
    index = CheckpointIndex.load(open_source(str(sharded.path)))
    plan = LayerPlan.from_index(index)
    assert plan.num_layers == 4
    assert {index.tensors[n].file for n in plan.layers[1]} == {
        "weights-a.safetensors",
        "zz/last.safetensors",
    }
    assert sorted(plan.layers[1]) == sorted(
        n for n in sharded.tensors if n.startswith("model.layers.1.")
    )
    assert not plan.tied


def test_ten_plus_layers_order():
    plan = LayerPlan.from_index(
        fake_index(sorted(layered("model.layers", 12, [])))
    )  # sorted as strings
    assert [p.split(".")[2] for p in (layer[0] for layer in plan.layers)] == [
        str(i) for i in range(12)
    ]


def test_missing_layer_is_named():
    names = [n for n in layered("model.layers", 5, []) if ".2." not in n and ".3." not in n]
    with pytest.raises(IncompleteLayerError) as err:
        LayerPlan.from_index(fake_index(names))
    assert "decoder layers 2, 3 of model.layers.0..4" in str(err.value)
    assert "mem://m" in str(err.value)


def test_explicit_prefix():
    names = layered("model.layers", 2, []) + layered("vision.blocks", 5, [])
    assert infer_layer_prefix(names) == "vision.blocks"
    plan = LayerPlan.from_index(fake_index(names), layer_prefix="model.layers.")
    assert plan.layer_prefix == "model.layers" and plan.num_layers == 2
    assert len(plan.other) == 15


def test_bad_prefix_and_no_layers():
    with pytest.raises(LayerLayoutError, match="'decoder.blocks'"):
        LayerPlan.from_index(
            fake_index(layered("model.layers", 2, [])), layer_prefix="decoder.blocks"
        )
    with pytest.raises(LayerLayoutError, match="layer_prefix="):
        LayerPlan.from_index(fake_index(["a.weight", "b.weight"]))
