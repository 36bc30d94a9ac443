"""Assembling a streaming model: skeleton, weight map, residency, hooks."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from rabbit_engine.attention import select_attention
from rabbit_engine.budget import plan_residency, resolve_budget
from rabbit_engine.layout import LayoutAdapter
from rabbit_engine.model import streaming_class
from rabbit_engine.options import SAFETENSORS_DTYPES, parse_device, parse_dtype
from rabbit_engine.profiler import Profiler
from rabbit_engine.skeleton import build_skeleton, causal_lm_class, move_buffers
from rabbit_engine.staging import CudaStager
from rabbit_engine.streamer import LayerStreamer
from rabbit_engine.weights import WeightMap
from rabbit_store import CheckpointIndex, LayerReader

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH = 2  # layers read ahead; see docs/performance.md for the measurement behind it


def checkpoint_dtype(index: CheckpointIndex) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes: the model's own dtype."""
    weights: Counter[str] = Counter()
    for info in index.tensors.values():
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
            weights[info.dtype] += info.nbytes
    return SAFETENSORS_DTYPES[weights.most_common(1)[0][0]] if weights else torch.float32


def load_streaming_model(
    source,
    *,
    config: PretrainedConfig,
    adapter: LayoutAdapter,
    index: CheckpointIndex | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = "auto",
    max_memory: int | str | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    profile: bool = False,
    bit_exact: bool = False,
) -> PreTrainedModel:
    device = parse_device(device)
    index = index or CheckpointIndex.load(source)
    dtype = parse_dtype(dtype) or checkpoint_dtype(index)
    model_class = causal_lm_class(config)
    attn = select_attention(
        attn_implementation,
        supports_flash=bool(getattr(model_class, "_supports_flash_attn", False)),
        supports_sdpa=bool(getattr(model_class, "_supports_sdpa", False)),
        dtype=dtype,
        device=device,
    )
    model = build_skeleton(config, model_class=model_class, dtype=dtype, attn_implementation=attn)
    logger.info("Model initialized with attn_implementation=%r", attn)
    if source.exists("generation_config.json"):
        model.generation_config = GenerationConfig.from_dict(
            source.read_json("generation_config.json")
        )
    layout = adapter.layout(model)
    weight_map = WeightMap(
        model,
        index,
        layers_prefix=layout.layers_prefix,
        num_layers=len(layout.layers),
        device=device,
        align=bit_exact,
    )
    budget = resolve_budget(max_memory, device)
    resident = plan_residency(weight_map, len(layout.layers), budget, prefetch)
    profiler = Profiler(profile)
    stager = None
    if device.type == "cuda":
        largest = max((weight_map.nbytes(i) for i in range(len(layout.layers))), default=0)
        stager = CudaStager(device, largest, slots=prefetch + 1)
    streamer = LayerStreamer(
        weight_map,
        LayerReader(source, index),
        layout.layers,
        resident_layers=resident,
        prefetch=prefetch,
        profiler=profiler,
        stager=stager,
    )
    move_buffers(model, device)
    streamer.load_resident()
    model.__class__ = streaming_class(type(model))
    model._rabbit_streamer = streamer
    model._rabbit_device = device
    model._rabbit_profiler = profiler
    return model
