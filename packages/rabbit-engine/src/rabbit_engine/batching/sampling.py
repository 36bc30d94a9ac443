"""Picking one request's next token from its logits, with its own settings and random stream.

transformers' logits warpers do the work (the same code `generate` runs, so a greedy request gives
`generate`'s greedy tokens); what is ours is only that each request in a batch has its own list and
its own `torch.Generator`, so a seeded request samples the same text alone or beside others.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rabbit_engine.batching.requests import SamplingParams


class TokenPicker:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def pick(self, context_ids: list[int], logits: torch.Tensor) -> int:
        """`logits` [vocab] for the position after `context_ids`."""
        scores = logits.float().unsqueeze(0)
        if self.processors:
            ids = torch.tensor([context_ids], dtype=torch.long)
            scores = self.processors(ids, scores)
        if self.params.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def greedy_all(self, context_ids: list[int], logits: torch.Tensor) -> list[int]:
        """Greedy picks for consecutive positions [k, vocab] (speculative verification); the
        repetition penalty of each position sees the tokens before it."""
        if not self.processors:
            return logits.float().argmax(dim=-1).tolist()
        picks = []
        context = list(context_ids)
        for k in range(logits.shape[0]):
            picks.append(self.pick(context, logits[k]))
            context.append(picks[-1])
        return picks
