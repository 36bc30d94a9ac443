"""What every remote-code family adapter is made of, and the conversion ops they share.

A family whose hub checkpoints ship their own modeling code is served by a transformers class that
computes the same function: its config.json is translated into that class's config, its
checkpoint keys are renamed (transformers' `WeightRenaming`) and its fused tensors split
(`WeightConverter` with the ops below) while each layer streams from the original shards, and
whatever the class cannot express from a config alone is set on the built model (`prepare`).
No code from the checkpoint runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import ConversionOps, WeightTransform

from rabbit_engine.errors import WeightMismatchError
from rabbit_store.errors import InvalidCheckpointError, RabbitError

logger = logging.getLogger(__name__)

#: Attribute set on a translated config: the remote family (adapter) it was translated for.
FAMILY_ATTR = "rabbit_remote_family"


class RemoteConfigError(InvalidCheckpointError):
    """A remote-code family's config.json lacks a field its translation needs, or sets one to a
    value no supported checkpoint uses; `field` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class SequenceTooLongError(RabbitError, ValueError):
    """A sequence past the length up to which a family's translation is exact (QWen's dynamic NTK
    and logN scaling, a dynamic rotary scaling, start there)."""


class Fields:
    """config.json of one family, read with errors that name the file, the family and the field."""

    def __init__(self, data: dict[str, Any], location: str, family: str) -> None:
        self.data = data
        self.location = location
        self.family = family

    def need(self, name: str, kind: type | tuple[type, ...] = int) -> Any:
        """A field the translation cannot do without."""
        value = self.data.get(name)
        if value is None:
            raise RemoteConfigError(
                f"{self.location}/config.json: model_type={self.family!r} needs {name!r}, "
                "which this config lacks; is it the config.json the checkpoint was saved with?",
                field=name,
            )
        return self._typed(name, value, kind)

    def get(self, name: str, default: Any, kind: type | tuple[type, ...] | None = None) -> Any:
        value = self.data.get(name, default)
        if value is None:
            value = default
        return value if kind is None or value is None else self._typed(name, value, kind)

    def _typed(self, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise RemoteConfigError(
                f"{self.location}/config.json: {name}={value!r} is not a valid "
                f"{'/'.join(k.__name__ for k in kinds)} for model_type={self.family!r}.",
                field=name,
            )
        return value

    def refuse(self, name: str, why: str) -> RemoteConfigError:
        return RemoteConfigError(
            f"{self.location}/config.json: {name}={self.data.get(name)!r} is not supported for "
            f"model_type={self.family!r}: {why}.",
            field=name,
        )

    def divisible(self, name: str, value: int, by_name: str, by: int) -> None:
        if by <= 0 or value % by:
            raise RemoteConfigError(
                f"{self.location}/config.json: {name}={value} is not a multiple of "
                f"{by_name}={by} (model_type={self.family!r}).",
                field=name,
            )


@dataclass(frozen=True)
class RemoteFamily:
    """One family: how to recognise it, translate its config, map its keys, prepare its model.

    `fused` gives, for a translated config, the expected shape of each checkpoint tensor a
    converter splits (by key suffix): a converter that fails inside transformers only leaves its
    targets unloaded, so these are checked up front, naming the tensor."""

    name: str  # family (and adapter) name: a model_type, or a variant of one (baichuan_alibi)
    model_type: str  # what config.json says
    summary: str  # what it is streamed as, for the support table and `rabbit inspect`
    translate: Callable[[Fields], PretrainedConfig]
    conversions: Callable[[PretrainedConfig], list[WeightTransform]]
    fused: Callable[[PretrainedConfig], dict[str, tuple[int, ...]]] = lambda config: {}
    matches: Callable[[dict[str, Any]], bool] = lambda data: True
    prepare: Callable[[PreTrainedModel], None] | None = None


def check_fused_shapes(family: RemoteFamily, config: PretrainedConfig, index) -> None:
    """Every tensor a converter splits has the shape the config implies (named if not)."""
    expected = family.fused(config)
    if not expected:
        return
    for key, info in index.tensors.items():
        for suffix, shape in expected.items():
            if key.endswith(suffix) and tuple(info.shape) != tuple(shape):
                raise WeightMismatchError(
                    f"{info.file}: tensor {key!r} has shape {list(info.shape)}, but the "
                    f"{family.name} config implies {list(shape)}. Is config.json the one this "
                    "checkpoint was saved with?"
                )


def guard_length(model: PreTrainedModel, limit: int, why: str) -> None:
    """Refuse a forward whose total length (cache + new tokens) passes `limit`."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            return None
        past = kwargs.get("past_key_values")
        total = int(ids.shape[1]) + (past.get_seq_length() if past is not None else 0)
        if total > limit:
            raise SequenceTooLongError(
                f"{type(model).__name__} ({getattr(model.config, FAMILY_ATTR, '?')}): a sequence "
                f"of {total} tokens is past {limit}, where {why}; RabbitLLM streams this family "
                "exactly only up to there (pass trust_remote_code=True to run the checkpoint's "
                "own code instead)."
            )
        return None

    model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def _single(input_dict: dict[str, Any]) -> torch.Tensor:
    (tensors,) = input_dict.values()
    return tensors[0] if isinstance(tensors, list) else tensors


class SplitRows(ConversionOps):
    """Split a fused tensor's rows into pieces of given sizes, one per target ([q|k|v] with k and
    v narrower than q under grouped attention; transformers 5.0 has only the even `Chunk`)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.dim = 0

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        parts = torch.split(_single(input_dict), self.sizes, dim=0)
        return {t: p.contiguous() for t, p in zip(target_patterns, parts, strict=True)}


class SplitGroupedQKV(ConversionOps):
    """InternLM2's wqkv: rows grouped per KV head as [q_0..q_{G-1}, k, v] blocks of head_dim rows;
    gives Llama's q, k, v (query head i then uses KV head i // G, as `repeat_kv` does)."""

    def __init__(self, num_kv_heads: int, group: int, head_dim: int) -> None:
        self.num_kv_heads, self.group, self.head_dim = num_kv_heads, group, head_dim

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = _single(input_dict)
        rest = tuple(tensor.shape[1:])
        grouped = tensor.view(self.num_kv_heads, self.group + 2, self.head_dim, *rest)
        q = grouped[:, : self.group].reshape(-1, *rest)
        k = grouped[:, self.group].reshape(-1, *rest)
        v = grouped[:, self.group + 1].reshape(-1, *rest)
        return {t: p.contiguous() for t, p in zip(target_patterns, (q, k, v), strict=True)}


class NormalizeRows(ConversionOps):
    """Baichuan2's NormHead: each vocabulary row of lm_head L2-normalised once, at load (the
    original normalises on its first eval forward; checkpoints store raw rows)."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = _single(input_dict)
        normed = torch.nn.functional.normalize(tensor.float(), dim=1)
        return {target_patterns[0]: normed.to(tensor.dtype)}
