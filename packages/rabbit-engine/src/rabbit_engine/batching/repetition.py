"""Telling a generation that has fallen into a loop from text that merely repeats itself a little.

Small models, greedy or sampled, fall into loops: the bundled SmolLM2-135M asked for a poem about
Paris writes five good lines, then "A place where the beauty of the world is revealed," over and
over until the token budget runs out (the issue's report: 512 tokens of looping verse). In a
layer-streaming engine every one of those tokens costs a full read of the weights, so the loop is
worth stopping as soon as it is certain.

What counts as a loop: the tail of the generated ids is periodic with some period p (1 <= p <= 64
tokens: one token, a phrase, a line, a short sentence) and the periodic stretch covers both at
least `min_repeats` copies of the pattern and at least `min_span` tokens. The copy count lets a
refrain or a line written twice through; the span lets short periods through that real text
repeats a few times. Measured with the bundled model's tokenizer: a 5x5 list of zeros in Python is
80 periodic tokens (period 16), ten empty `- [ ]` checklist lines 48, `print("*****")` five times
30; the model's own loops (the poem above, period 12; "estándú, " sampled at temperature 0.7,
period 5) go on until the budget ends. With `min_span` 96 the code and lists pass and the loops
stop about 100 tokens after they start (at 48 the zero grid would be cut mid-row). Text that
legitimately repeats one pattern for longer (an 8x8 grid of zeros) needs `stop_on_repetition`
off; tests/engine/test_repetition.py holds both kinds.

Cost: one C-level list comparison per candidate period over at most `window` tokens, so checking
after every step is O(tail), independent of how long the generation already is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import StoppingCriteria

from rabbit_engine.errors import InvalidOptionError

MAX_PERIOD = 64
MIN_REPEATS = 3
MIN_SPAN = 96


def _check_bounds(min_span: int, min_repeats: int, max_period: int) -> None:
    for name, value, low in (
        ("min_span", min_span, 2),
        ("min_repeats", min_repeats, 2),
        ("max_period", max_period, 1),
    ):
        if value < low:
            raise InvalidOptionError(f"repetition check: {name}={value!r} must be >= {low}")


def window(
    *, min_span: int = MIN_SPAN, min_repeats: int = MIN_REPEATS, max_period: int = MAX_PERIOD
) -> int:
    """How many trailing tokens `repeating_tail` ever looks at (callers may keep only these)."""
    return max(min_span, min_repeats * max_period)


def repeating_tail(
    ids: Sequence[int],
    *,
    min_span: int = MIN_SPAN,
    min_repeats: int = MIN_REPEATS,
    max_period: int = MAX_PERIOD,
) -> bool:
    """True when the last tokens of `ids` repeat one pattern of period <= `max_period` at least
    `min_repeats` times over at least `min_span` tokens.

    Pass only the generated ids: a prompt that repeats itself is no reason to stop.
    """
    _check_bounds(min_span, min_repeats, max_period)
    n = len(ids)
    if n < min_span:
        return False
    tail = list(ids[-window(min_span=min_span, min_repeats=min_repeats, max_period=max_period) :])
    n = len(tail)
    last = tail[-1]
    for period in range(1, max_period + 1):
        span = max(min_span, min_repeats * period)
        if span > n:
            break  # longer periods need even more tokens
        # cheap reject first: most periods fail on the last token already
        if tail[-1 - period] != last:
            continue
        # the last `span` tokens are p-periodic iff they equal themselves shifted by p
        if tail[n - span + period :] == tail[n - span : n - period]:
            return True
    return False


class RepetitionStop(StoppingCriteria):
    """`model.generate` stopping criterion: ends each batch row whose generated tail is a loop.

    `prompt_length` is the width of the input ids generate() was given (with left padding, the
    same for every row); tokens before it are the prompt (or a chat's history) and never count.
    transformers checks stopping criteria once per step; with prompt lookup or a draft model a step
    may accept several tokens, so there a loop can run up to one draft longer than without.
    """

    def __init__(
        self,
        prompt_length: int,
        *,
        min_span: int = MIN_SPAN,
        min_repeats: int = MIN_REPEATS,
        max_period: int = MAX_PERIOD,
    ) -> None:
        _check_bounds(min_span, min_repeats, max_period)
        if prompt_length < 0:
            raise InvalidOptionError(
                f"RepetitionStop: prompt_length={prompt_length!r} must be >= 0"
            )
        self.prompt_length = prompt_length
        self.min_span = min_span
        self.min_repeats = min_repeats
        self.max_period = max_period
        self.triggered = False  # whether any row was stopped for a loop (for a note to the user)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        generated = input_ids.shape[-1] - self.prompt_length
        if generated < self.min_span:
            return done
        keep = min(
            generated,
            window(
                min_span=self.min_span, min_repeats=self.min_repeats, max_period=self.max_period
            ),
        )
        rows = input_ids[:, -keep:].tolist()
        for i, row in enumerate(rows):
            if repeating_tail(
                row,
                min_span=self.min_span,
                min_repeats=self.min_repeats,
                max_period=self.max_period,
            ):
                done[i] = True
                self.triggered = True
        return done
