"""The proof of correctness: RabbitLLM's streamed model against transformers' in-memory model.

For every family the factory (tests/models/families.py) builds, a tiny random model is saved with
`save_pretrained` (sharded and single-file), loaded by RabbitLLM and compared with the in-memory
model. These are the checks rabbit_models' support table records for each supported model_type.

Tolerances: both sides run transformers' own forward with the same weights and dtype, so the only
difference left is where the weights sit in memory. RabbitLLM uses them in place in the mapped
file, where transformers-saved shards put them at addresses that are not 64-byte aligned, and oneDNN
then picks another vector path for some kernels: a few float32 ulps on the logits. The float32
bound is the issue's 1e-5, or 32 ulps at the logits' magnitude where that is larger (we see up to
~15); `bit_exact=True` (weights copied to aligned memory) must give exactly 0.0, which proves the
alignment is the only source. In bf16 we require identical greedy tokens and logits within one bf16
ulp at the logits' magnitude (2**-7 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from rabbitllm import AutoModel
from tests.models.families import (
    FAMILIES,
    PAD_ID,
    VOCAB,
    available_families,
    build_model,
    save_checkpoint,
)

# The families the first issue named (FamilySpec.required) run on every test run; every other
# family runs under the `slow` marker (CI and the README test command run those too). Only
# families this transformers ships (rabbit_models' table says since which version); none is skipped.
FAMILY_IDS = [
    f if FAMILIES[f].required else pytest.param(f, marks=pytest.mark.slow)
    for f in sorted(available_families())
]
BIT_EXACT_IDS = [f for f in sorted(available_families()) if FAMILIES[f].bit_exact]
PROMPT_LEN = 24
FP32_TOL = 1e-5


def _fp32_close(expected: torch.Tensor, got: torch.Tensor, ulps: int = 32) -> tuple[bool, float]:
    magnitude = expected.abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(max(magnitude, 1e-30))) - 23)
    diff = (expected - got).abs().max().item()
    return diff <= max(FP32_TOL, ulps * ulp), diff


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (reference model, sharded dir, single-file dir), built once per module."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            ref = build_model(family, dtype=torch.float32, seed=0)
            root = tmp_path_factory.mktemp(family)
            cache[family] = (
                ref,
                save_checkpoint(ref, root / "sharded", sharded=True),
                save_checkpoint(ref, root / "single", sharded=False),
            )
        return cache[family]

    return get


def _prompt(vocab: int, batch: int = 1, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 1, (batch, length), generator=g)


def _gen_kwargs(model) -> dict:
    # min_new_tokens keeps an EOS from ending one side early; pad_token_id silences the warning.
    return dict(pad_token_id=PAD_ID)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_fp32_logits_and_decode_steps(family, checkpoints):
    ref, sharded, single = checkpoints(family)
    ids = _prompt(VOCAB)
    ulps = FAMILIES[family].fp32_ulps
    if not FAMILIES[family].kv_cache:
        _fp32_logits_and_decode_steps_own_state(ref, ids, (sharded, single), ulps)
        return
    for path in (sharded, single):
        with AutoModel.from_pretrained(path, dtype=torch.float32) as model, torch.no_grad():
            cache_ref, cache_rab = DynamicCache(config=ref.config), DynamicCache(config=ref.config)
            out_ref = ref(ids, past_key_values=cache_ref, use_cache=True)
            out_rab = model(ids, past_key_values=cache_rab, use_cache=True)
            ok, diff = _fp32_close(out_ref.logits, out_rab.logits, ulps)
            assert ok, f"prompt: {diff}"
            assert out_rab.past_key_values is cache_rab
            token = out_ref.logits[:, -1:].argmax(-1)
            for step in range(10):
                out_ref = ref(token, past_key_values=cache_ref, use_cache=True)
                out_rab = model(token, past_key_values=cache_rab, use_cache=True)
                ok, diff = _fp32_close(out_ref.logits, out_rab.logits, ulps)
                assert ok, f"decode step {step}: {diff}"
                token = out_ref.logits[:, -1:].argmax(-1)
            assert cache_rab.get_seq_length() == PROMPT_LEN + 10


def _fp32_logits_and_decode_steps_own_state(ref, ids, paths, ulps: int) -> None:
    """The same check for a model whose decode state is not a DynamicCache (SSM/RNN state):
    transformers' own generate() carries that state; its per-step logits are compared."""
    kw = dict(
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **_gen_kwargs(ref),
    )
    for path in paths:
        with AutoModel.from_pretrained(path, dtype=torch.float32) as model, torch.no_grad():
            ok, diff = _fp32_close(ref(ids).logits, model(ids).logits, ulps)
            assert ok, f"prompt: {diff}"
            expected, got = ref.generate(ids, **kw), model.generate(ids, **kw)
            assert torch.equal(got.sequences, expected.sequences)
            for step, (a, b) in enumerate(zip(expected.logits, got.logits, strict=True)):
                ok, diff = _fp32_close(a, b, ulps)
                assert ok, f"decode step {step}: {diff}"


@pytest.mark.parametrize("family", BIT_EXACT_IDS)
def test_bit_exact_mode_gives_identical_fp32_logits(family, checkpoints):
    ref, sharded, _ = checkpoints(family)
    ids = _prompt(VOCAB)
    with (
        AutoModel.from_pretrained(sharded, dtype=torch.float32, bit_exact=True) as model,
        torch.no_grad(),
    ):
        cache_ref, cache_rab = DynamicCache(config=ref.config), DynamicCache(config=ref.config)
        a = ref(ids, past_key_values=cache_ref, use_cache=True).logits
        b = model(ids, past_key_values=cache_rab, use_cache=True).logits
        assert torch.equal(a, b)
        token = a[:, -1:].argmax(-1)
        for _ in range(5):
            a = ref(token, past_key_values=cache_ref, use_cache=True).logits
            b = model(token, past_key_values=cache_rab, use_cache=True).logits
            assert torch.equal(a, b)
            token = a[:, -1:].argmax(-1)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_generate_greedy_sampled_and_batched(family, checkpoints):
    ref, sharded, _ = checkpoints(family)
    vocab = VOCAB
    kw = _gen_kwargs(ref)
    with AutoModel.from_pretrained(sharded, dtype=torch.float32) as model:
        ids = _prompt(vocab)
        greedy = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, **kw)
        expected = ref.generate(ids, **greedy)
        assert torch.equal(model.generate(ids, **greedy), expected)
        assert len(set(expected[0, PROMPT_LEN:].tolist())) > 1, (
            "degenerate reference: one token repeated"
        )

        sampled = dict(
            max_new_tokens=12, min_new_tokens=12, do_sample=True, top_k=0, temperature=1.0, **kw
        )
        torch.manual_seed(123)
        expected = ref.generate(ids, **sampled)
        torch.manual_seed(123)
        assert torch.equal(model.generate(ids, **sampled), expected)

        # Three prompts of different lengths, left-padded, with an attention mask.
        lengths = (PROMPT_LEN, PROMPT_LEN - 7, PROMPT_LEN - 15)
        batch = _prompt(vocab, batch=3, seed=2)
        mask = torch.ones_like(batch)
        for row, n in enumerate(lengths):
            batch[row, : PROMPT_LEN - n] = kw["pad_token_id"]
            mask[row, : PROMPT_LEN - n] = 0
        batched = dict(
            attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, **kw
        )
        assert torch.equal(model.generate(batch, **batched), ref.generate(batch, **batched))


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_bf16_tokens_and_logits(family, checkpoints):
    _, sharded, _ = checkpoints(family)
    ref = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16).eval()
    ids = _prompt(VOCAB)
    with AutoModel.from_pretrained(sharded, dtype="bfloat16") as model, torch.no_grad():
        assert model.dtype == ref.dtype  # bf16, or what transformers keeps in fp32 decides
        try:
            a = ref(ids).logits.float()
        except RuntimeError as exc:
            # transformers' own model cannot run this family in bf16 on this version (CTRL on
            # 5.0.x: layer_norm mixed dtype): the streamed model must fail the same way.
            with pytest.raises(type(exc)):
                model(ids)
            return
        b = model(ids).logits.float()
        bound = a.abs().max().item() * FAMILIES[family].bf16_tolerance
        assert (a - b).abs().max().item() <= bound
        greedy = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, **_gen_kwargs(ref))
        assert torch.equal(model.generate(ids, **greedy), ref.generate(ids, **greedy))
