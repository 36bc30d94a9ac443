"""Drafts from a small resident model (assisted decoding) for the rows of a continuous batch.

transformers' assisted generation (`generate(assistant_model=...)`, what `rabbit generate
--draft-model` uses) drives one batch inside its own loop; a continuous batch verifies every row's
draft in the scheduler's shared pass instead, so the draft side is ours: per request, a cache of the
draft model that is cropped back to the verified prefix after each step (the same bookkeeping
transformers' AssistedCandidateGenerator does for its one sequence).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from rabbit_engine.batching.rows import batchable_cache
from rabbit_engine.errors import InvalidOptionError


@dataclass
class _DraftState:
    cache: object
    cached_ids: list[int] = field(default_factory=list)


class DraftModel:
    """Greedy proposals of `model` (small, fully in memory, same tokenizer as the target)."""

    def __init__(self, model, *, tokens: int = 5) -> None:
        if tokens < 1:
            raise InvalidOptionError(f"draft tokens={tokens!r}: must be at least 1")
        if batchable_cache(model.config) is None:
            raise InvalidOptionError(
                f"draft model: {model.config.model_type} has sliding-window or recurrent layers, "
                "whose cache cannot be cut back after a rejected draft; use a full-attention model"
            )
        self.model = model
        self.tokens = tokens
        self.device = next(model.parameters()).device
        forward_args = inspect.signature(type(model).forward).parameters
        self._cache_argument = "cache" if "cache" in forward_args else "past_key_values"
        self._states: dict[str, _DraftState] = {}

    def propose(self, key: str, ids: list[int], count: int) -> list[int]:
        """Up to `count` greedy tokens of the draft model after `ids` (the request's tokens)."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _DraftState(batchable_cache(self.model.config))
        keep = 0
        limit = min(len(state.cached_ids), len(ids) - 1)
        while keep < limit and state.cached_ids[keep] == ids[keep]:
            keep += 1
        if keep < len(state.cached_ids):
            # negative: "drop this many" (5.24 refuses a positive length, 5.0 takes both)
            state.cache.crop(keep - len(state.cached_ids))
            del state.cached_ids[keep:]
        feed = ids[keep:]
        proposal: list[int] = []
        for _ in range(count):
            out = self.model(
                input_ids=torch.tensor([feed], device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_argument: state.cache},
            )
            state.cached_ids.extend(feed)
            token = int(out.logits[0, -1].argmax())
            proposal.append(token)
            feed = [token]
        return proposal

    def forget(self, key: str) -> None:
        self._states.pop(key, None)
