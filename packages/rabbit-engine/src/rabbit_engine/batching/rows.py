"""The shared KV cache of a continuous batch: one row per sequence, one column per cache slot.

Sequences join and leave between steps and take different numbers of tokens per step (a prompt, one
token, or one token plus speculative ones), so the columns of a row are not all its own: a column
where a row had nothing to feed, or whose speculative token was rejected, is a *hole*, masked out
for that row by the attention mask and never read again. Positions are passed explicitly, so holes
do not shift a row's rotary positions. Columns that are holes in every row are dropped.

transformers' continuous batching uses a paged cache instead; it is not used here because its
manager crashes on CPU in transformers 5.0 and takes one sampling config for every request (see
docs/serving.md). Holes cost some attention compute; a paged cache would not, but the cost is small
next to a streamed pass.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def batchable_cache(config) -> DynamicCache | None:
    """A fresh cache for the batch, or None when the model's cache cannot hold holes.

    Only full-attention layers can: a sliding-window layer would count holes against its window,
    and a recurrent state (Mamba, linear attention) would have consumed the pad tokens.
    """
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config transformers builds no DynamicCache for
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return cache


class BatchRows:
    """The cache plus the column mask that says which cache slots are real for each row."""

    def __init__(self, config, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.cache: DynamicCache | None = batchable_cache(config)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def add_rows(self, count: int) -> None:
        """New sequences start with every existing column a hole."""
        if count == 0:
            return
        if self.size == 0:
            self.reset()
        self.mask = torch.cat([self.mask, self.mask.new_zeros(count, self.columns)])
        for layer in self._layers():
            for name in ("keys", "values"):
                old = getattr(layer, name)
                pad = old.new_zeros(count, *old.shape[1:])
                setattr(layer, name, torch.cat([old, pad]))

    def merge(self, other: BatchRows) -> None:
        """Append `other`'s rows (sequences prefilled in a pass of their own); the one with fewer
        columns gets holes on the left."""
        if other.size == 0:
            return
        if self.size == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.columns, other.columns)
        self._pad_left(width - self.columns)
        other._pad_left(width - other.columns)
        self.mask = torch.cat([self.mask, other.mask])
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])

    def _pad_left(self, count: int) -> None:
        if count == 0:
            return
        self.mask = torch.cat([self.mask.new_zeros(self.size, count), self.mask], dim=1)
        for layer in self._layers():
            for name in ("keys", "values"):
                old = getattr(layer, name)
                pad = old.new_zeros(old.shape[0], old.shape[1], count, *old.shape[3:])
                setattr(layer, name, torch.cat([pad, old], dim=2))

    def keep_rows(self, keep: list[int]) -> None:
        if len(keep) == self.size:
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, index)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.drop_empty_columns()

    def extend(self, step_mask: torch.Tensor) -> torch.Tensor:
        """Append this step's columns; returns the full attention mask for the forward."""
        self.mask = torch.cat([self.mask, step_mask], dim=1)
        return self.mask

    def hide(self, row: int, columns: slice) -> None:
        """Turn rejected speculative slots of one row into holes."""
        self.mask[row, columns] = 0

    def drop_empty_columns(self, min_fraction: float = 0.125) -> None:
        """Drop columns that are holes in every row once they are worth the copy."""
        if self.columns == 0:
            return
        used = self.mask.any(dim=0)
        empty = int((~used).sum())
        if empty == 0 or empty < max(1, int(self.columns * min_fraction)):
            return
        index = used.nonzero().squeeze(1)
        self.mask = self.mask.index_select(1, index)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(2, index)
            layer.values = layer.values.index_select(2, index)

    def reset(self) -> None:
        self.cache = batchable_cache(self.config)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
