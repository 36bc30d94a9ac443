"""Proves the tiny-model factory in families.py with plain transformers (no engine involved).

For every family the installed transformers can build: a save_pretrained round trip (single file
and >= 3 shards) reloads to bit-identical logits, greedy decoding with a DynamicCache matches
recomputing the whole sequence without a cache, and the greedy tokens are not all the same.
"""

from __future__ import annotations

import json

import pytest
import torch

try:  # tests/ is not a package: pytest's default (prepend) import mode puts this folder on sys.path
    from families import (
        BOS_ID,
        EOS_ID,
        FAMILIES,
        PAD_ID,
        REJECTED,
        VOCAB,
        available_families,
        build_model,
        save_checkpoint,
    )
except ImportError:  # pragma: no cover - importlib mode / run from the repository root
    from tests.models.families import (  # type: ignore[no-redef]
        BOS_ID,
        EOS_ID,
        FAMILIES,
        PAD_ID,
        REJECTED,
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


@pytest.fixture(scope="module", params=available_families())
def family(request):
    model_type = request.param
    model = build_model(model_type)
    return model_type, model


def test_registry_is_consistent():
    assert FAMILIES, "no families"
    assert not set(FAMILIES) & set(REJECTED), set(FAMILIES) & set(REJECTED)
    for name, spec in FAMILIES.items():
        assert spec.model_type == name
    for name, reason in REJECTED.items():
        assert reason.strip(), name


def test_every_causal_lm_is_classified():
    """Each model_type transformers maps to a causal LM is either a family or rejected."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(FAMILIES) - set(REJECTED))
    assert not missing, f"unclassified causal-LM types (add to FAMILIES or REJECTED): {missing}"


def test_tiny_config(family):
    model_type, model = family
    cfg = model.config
    assert cfg.model_type == model_type
    assert cfg.hidden_size == 64
    assert cfg.vocab_size == VOCAB
    assert 2 <= cfg.num_hidden_layers <= (4 if model_type == "longcat_flash" else 3)
    assert cfg.max_position_embeddings >= 256
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tied_and_untied_both_covered():
    tied = {name: FAMILIES[name].make_config().tie_word_embeddings for name in available_families()}
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
    assert reloaded.config.model_type == model_type
    with torch.no_grad():
        got = reloaded(ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), (got - expected).abs().max()


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
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=DynamicCache(config=model.config),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD_ID,
        )
    cached = out[:, ids.shape[1] :]
    recomputed = _greedy_without_cache(model, ids, NEW_TOKENS)
    assert cached.tolist() == recomputed.tolist(), (cached.tolist(), recomputed.tolist())
    tokens = cached[0].tolist()
    assert len(set(tokens)) > 1, f"{model_type}: degenerate greedy tokens {tokens}"
    assert EOS_ID not in tokens
