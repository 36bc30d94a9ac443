"""Prompt-lookup drafts: the tokens that followed the last n-gram's previous occurrence.

The idea and its defaults are transformers' (`prompt_lookup_num_tokens`, used by `rabbit generate
--prompt-lookup`). transformers' `PromptLookupCandidateGenerator` works on one batch tensor inside
its own assisted-generation loop and its constructor changed between 5.0 and 5.24; the scheduler
needs a draft per row of a continuous batch, so this small function is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # transformers' default max_matching_ngram_size is 2; 3 first avoids weak matches


def propose(ids: Sequence[int], count: int, *, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `count` tokens continuing `ids`, copied from after the most recent earlier match of
    its last n tokens (longest n first); empty when nothing matches."""
    if count <= 0 or len(ids) < 2:
        return []
    for n in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = list(ids[-n:])
        for start in range(len(ids) - n - 1, -1, -1):
            if list(ids[start : start + n]) == tail:
                follow = list(ids[start + n : start + n + count])
                if follow:
                    return follow
    return []
