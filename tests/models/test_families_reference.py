"""Proves the tiny-model factory in families.py with plain transformers (no engine involved).

For every family the installed transformers can build: a save_pretrained round trip (single file
and >= 3 shards) reloads to bit-identical logits, greedy decoding with a DynamicCache matches
recomputing the whole sequence without a cache, and the greedy tokens are not all the same.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.models.families import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    PAD_ID,
    VOCAB,
    available_families,
    build_model,
    save_checkpoint,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

transformers.logging.set_verbosity_error()

# transformers >= 5.2x renames generate(past_key_values=) to cache=; the old name works in every
# supported version, so keep it and silence the rename notice.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.* is deprecated:FutureWarning")

NEW_TOKENS = 8
PROMPT_LEN = 30  # longer than every sliding window (8) in the factory


def _prompt(batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(2, VOCAB - 2, (batch, PROMPT_LEN), generator=gen)


# As in test_family_parity: the first issue's families by default, every other one under `slow`.
@pytest.fixture(
    scope="module",
    params=[
        f if FAMILIES[f].required else pytest.param(f, marks=pytest.mark.slow)
        for f in available_families()
    ],
)
def family(request):
    model_type = request.param
    model = build_model(model_type)
    return model_type, model


def test_family_builds_the_class_a_checkpoint_of_its_type_loads_into(family):
    """The tiny model must be the class AutoModelForCausalLM picks for a real checkpoint of the
    type (a composite config builds its multimodal class, an alias its target): else the parity
    tests would verify another class than the one users stream."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type, model = family
    assert type(model).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def test_tiny_config(family):
    model_type, model = family
    cfg = model.config.get_text_config()
    assert cfg.hidden_size == 64
    assert cfg.vocab_size == VOCAB
    assert 2 <= cfg.num_hidden_layers <= 4
    # Recurrent models have no position limit, some configs no BOS/pad: checked where they exist.
    positions = getattr(cfg, "max_position_embeddings", 256)
    assert positions == -1 or positions >= 256  # -1: no limit (XLNet's relative positions)
    ids = (getattr(cfg, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id"))
    assert all(got in (want, None) for got, want in zip(ids, (PAD_ID, BOS_ID, EOS_ID), strict=True))
    assert sum(p.numel() for p in model.parameters()) < 4_000_000


def test_tied_and_untied_both_covered():
    tied = {
        name: getattr(FAMILIES[name].make_config().get_text_config(), "tie_word_embeddings", False)
        for name in available_families()
    }
    assert any(tied.values()) and not all(tied.values()), tied


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_reload_exact(family, sharded, tmp_path):
    model_type, model = family
    ids = _prompt()
    with torch.no_grad():
        expected = model(ids).logits
    path = save_checkpoint(model, tmp_path / model_type, sharded=sharded)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if sharded:
        assert len(files) >= 3, files
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"], files
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model.config.model_type
    # Every weight is in the reloaded model, and the logits match within the parity tests' float32
    # bound: MoE kernels round differently over the mapped file's alignment (a few ulps, as in
    # test_family_parity), and transformers re-zeroes a padding embedding row on load (youtu),
    # so neither logits nor weights are compared bit for bit.
    assert set(reloaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        got = reloaded(ids).logits
    assert got.dtype == torch.float32
    ulp = 2.0 ** (math.floor(math.log2(expected.abs().max().item())) - 23)
    assert (got - expected).abs().max().item() <= max(1e-5, 32 * ulp)


def _greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq, use_cache=False).logits[:, -1]
            logits[:, EOS_ID] = -float("inf")  # what min_new_tokens does in generate()
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
    return seq[:, ids.shape[1] :]


def test_greedy_cache_matches_recompute(family):
    model_type, model = family
    ids = _prompt()
    # A model with its own decode state (SSM/RNN) gets the cache transformers picks for it.
    cache = DynamicCache(config=model.config) if FAMILIES[model_type].kv_cache else None
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD_ID,
        )
    cached = out[:, ids.shape[1] :]
    recomputed = _greedy_without_cache(model, ids, NEW_TOKENS)
    if FAMILIES[model_type].recompute_differs:  # documented; fails once transformers agrees
        assert cached.tolist() != recomputed.tolist(), "recompute_differs is stale: remove it"
        return
    assert cached.tolist() == recomputed.tolist(), (cached.tolist(), recomputed.tolist())
    tokens = cached[0].tolist()
    assert len(set(tokens)) > 1, f"{model_type}: degenerate greedy tokens {tokens}"
    assert EOS_ID not in tokens
