"""The loop detector: it must stop the loops the bundled model really falls into, and must not cut
text that repeats a little (lists, code with repeated lines, refrains, separators).

Texts are tokenized with SmolLM2's own tokenizer (read from the GGUF file the default model is built
from, in seconds, without building the model), so the periods and spans are those the scheduler and
the CLI see.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from rabbit_engine.batching.repetition import (
    MAX_PERIOD,
    MIN_REPEATS,
    MIN_SPAN,
    RepetitionStop,
    repeating_tail,
    window,
)
from rabbit_engine.errors import InvalidOptionError

# What SmolLM2-135M-Instruct wrote, greedy, for "Write a poem about Paris." (then the last line
# again until the 200-token budget ended), and sampled at temperature 0.7 / top-p 0.9, seed 3, for
# "What is the capital of Spain?".
POEM_HEAD = (
    "In the heart of the City of Light, where dreams are made,\n"
    "Paris, the City of the City,\n"
    "A place where the past and the future blend,\n"
    "A place where the beauty of the world is revealed,\n"
    "A place where the beauty of the world is revealed.\n\n"
    "Paris, the City of the City,\n"
)
POEM_LOOP = "A place where the beauty of the world is revealed,\n"
SPAIN_HEAD = "Estándú (Spain), "
SPAIN_LOOP = "estándú, "

ZERO_GRID = "grid = [\n" + "    [0, 0, 0, 0, 0],\n" * 5 + "]\n"
LEGIT = {
    "5x5 zero grid": ZERO_GRID,
    "the same print five times": "def stars():\n" + '    print("*****")\n' * 5,
    "table with blank rows": "| Name | Age |\n|------|-----|\n" + "| - | - |\n" * 4,
    "html list": "<ul>\n" + "  <li></li>\n" * 5 + "</ul>\n",
    "increments": "x = 0\n" + "x += 1\n" * 5 + "print(x)\n",
    "checklist": "- [ ] \n" * 10,
    "chorus": "We will, we will rock you\n" * 4,
    "laughter": "Ha " * 20,
    "separators": "Title\n" + "=" * 80 + "\n\nText\n" + "-" * 80 + "\n",
    "numbered list": "".join(f"{i}. {i}\n" for i in range(1, 41)),
    "zero matrix rows": "\n".join(["0 0 0 0"] * 6) + "\n",
    "refrain": (
        "Row, row, row your boat,\nGently down the stream.\n"
        "Merrily, merrily, merrily, merrily,\nLife is but a dream.\n\n"
    )
    * 2,
    "prose": (
        "The capital of France is Paris. Paris is known for the Eiffel Tower, the Louvre and "
        "its cafes. The city is divided by the Seine into the Left Bank and the Right Bank, and "
        "it has been the capital since the tenth century. Today it is home to more than two "
        "million people, and the wider region to about twelve million."
    ),
}


@pytest.fixture(scope="module")
def encode():
    from transformers import AutoTokenizer

    from rabbitllm.default_model import locate_gguf

    gguf = locate_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return lambda text: tok(text, add_special_tokens=False).input_ids


def first_stop(ids: Sequence[int], **kw) -> int | None:
    """How many tokens had been generated when the detector first fired (None: never)."""
    return next((n for n in range(1, len(ids) + 1) if repeating_tail(ids[:n], **kw)), None)


@pytest.mark.parametrize(
    ("head", "loop"), [(POEM_HEAD, POEM_LOOP), (SPAIN_HEAD, SPAIN_LOOP)], ids=["poem", "spain"]
)
def test_the_models_own_loops_stop_soon_after_they_start(encode, head, loop):
    ids = encode(head + loop * 30)
    start = len(encode(head))  # the loop begins here (the poem already said the line twice)
    period = len(encode(loop))
    stop = first_stop(ids)
    assert stop is not None, "a 30-times repeated line is a loop"
    assert start + 2 * period < stop <= start + MIN_SPAN + 2 * period


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_text_that_repeats_a_little_is_never_cut(encode, name):
    ids = encode(LEGIT[name])
    assert first_stop(ids) is None, f"{name!r} would be cut at token {first_stop(ids)}"


def test_the_zero_grid_would_be_cut_with_a_lower_span(encode):
    """Why MIN_SPAN is what it is: half of it cuts the 5x5 grid before its closing bracket."""
    ids = encode(ZERO_GRID)
    assert first_stop(ids, min_span=MIN_SPAN // 2) is not None


def test_bounds_of_period_and_copies():
    for period in (1, 7, MAX_PERIOD):
        pattern = list(range(1000, 1000 + period))
        need = max(MIN_SPAN, MIN_REPEATS * period)
        ids = [5, 6, 7] + (pattern * (need // period + 2))[: need - 1]
        assert not repeating_tail(ids), f"period {period}: one token short of the span"
        ids.append(pattern[(need - 1) % period])
        assert repeating_tail(ids), f"period {period}: exactly the span"
    too_long = list(range(MAX_PERIOD + 1)) * 4
    assert not repeating_tail(too_long), "periods above MAX_PERIOD are text, not a loop"
    assert repeating_tail(too_long, max_period=MAX_PERIOD + 1)
    assert not repeating_tail([9] * (MIN_SPAN - 1))
    assert repeating_tail([9] * MIN_SPAN)


def test_only_the_tail_is_read():
    """O(tail): a 100k-token generation costs what a 200-token one costs."""

    class TailOnly(Sequence):
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, index):
            if isinstance(index, slice):
                start = index.indices(self.n)[0]
                assert start >= self.n - window(), f"read from {start} of {self.n}"
                return [i % 3 for i in range(*index.indices(self.n))]
            raise AssertionError("read one token at a time")

    assert repeating_tail(TailOnly(100_000))


def test_bad_bounds_name_the_argument():
    with pytest.raises(InvalidOptionError, match="min_repeats"):
        repeating_tail([1] * 100, min_repeats=1)
    with pytest.raises(InvalidOptionError, match="prompt_length"):
        RepetitionStop(-1)


def test_stopping_criterion_is_per_row_and_ignores_the_prompt():
    prompt = torch.tensor([[4] * 100, list(range(100))])  # row 0's prompt is itself a "loop"
    fresh = torch.tensor([list(range(200, 300)), [7, 8] * 50])  # only row 1 loops
    stop = RepetitionStop(prompt_length=prompt.shape[1])
    assert stop(prompt[:, :], None).tolist() == [False, False]
    out = stop(torch.cat([prompt, fresh], dim=1), None)
    assert out.dtype == torch.bool and out.shape == (2,)
    assert out.tolist() == [False, True]
    assert stop.triggered


def cycling_model():
    """A one-layer Llama whose greedy next token is a fixed function of the current one: the
    layer adds nothing (zero output projections) and the head maps token t to NEXT[t], so from
    token 10 it writes 11..15 and then 0 1 2 3 4 forever. A loop by construction, on any
    transformers version."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    nxt = {t: (t + 1) % 5 for t in range(5)} | {t: t + 1 for t in range(5, 15)} | {15: 0}
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(16) * 4)
        model.lm_head.weight.zero_()
        for t, n in nxt.items():
            model.lm_head.weight[n, t] = 1.0
    return model


def test_generate_stops_a_looping_model():
    """In transformers' own generate: without the criterion the loop runs to max_new_tokens;
    with it, generation ends exactly where the detector first fires."""
    from transformers import StoppingCriteriaList

    model = cycling_model()
    ids = torch.tensor([[3, 7, 10]])
    kw = dict(max_new_tokens=200, do_sample=False, pad_token_id=0, eos_token_id=None)
    free = model.generate(ids, **kw)[0, ids.shape[1] :].tolist()
    assert free[:8] == [11, 12, 13, 14, 15, 0, 1, 2] and len(free) == 200
    stop = RepetitionStop(ids.shape[1])
    cut = model.generate(ids, stopping_criteria=StoppingCriteriaList([stop]), **kw)
    assert stop.triggered
    assert cut[0, ids.shape[1] :].tolist() == free[: first_stop(free)]
    assert first_stop(free) == 5 + MIN_SPAN  # the loop starts after 11..15
