"""Assembling a streaming model: skeleton, weight map, residency, hooks."""

from __future__ import annotations

import logging

from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from rabbit_engine.attention import select_attention
from rabbit_engine.budget import plan_residency, resolve_budget
from rabbit_engine.dtypes import checkpoint_dtype
from rabbit_engine.layout import LayoutAdapter
from rabbit_engine.model import contiguous_head_input, streaming_class
from rabbit_engine.options import StreamingOptions
from rabbit_engine.prequantized import attach_quantizer, refuse_ignored_tensors
from rabbit_engine.profiler import Profiler
from rabbit_engine.skeleton import build_skeleton, causal_lm_class, move_buffers
from rabbit_engine.staging import CudaStager
from rabbit_engine.streamer import LayerStreamer
from rabbit_engine.weights import WeightMap
from rabbit_store import CheckpointIndex, LayerReader

logger = logging.getLogger(__name__)


def load_streaming_model(
    source,
    *,
    config: PretrainedConfig,
    adapter: LayoutAdapter,
    index: CheckpointIndex | None = None,
    options: StreamingOptions | None = None,
) -> PreTrainedModel:
    """transformers' own model for `config`, with its decoder layers streamed from `source`."""
    options = options or StreamingOptions.create()
    device, prefetch = options.device, options.prefetch
    index = index or CheckpointIndex.load(source)
    dtype = options.dtype or checkpoint_dtype(index)
    model_class = causal_lm_class(config)
    attn = select_attention(
        options.attn_implementation,
        supports_flash=bool(getattr(model_class, "_supports_flash_attn", False)),
        supports_sdpa=bool(getattr(model_class, "_supports_sdpa", False)),
        dtype=dtype,
        device=device,
    )
    # "auto" that does not land on flash-attn leaves the choice to transformers, as its own
    # from_pretrained does: it picks per sub-model (a multimodal class that declares no sdpa
    # support still runs its text decoder with sdpa), where one string would force the whole
    # model onto the top class's fallback.
    per_sub_model = options.attn_implementation == "auto" and attn != "flash_attention_2"
    model = build_skeleton(
        config,
        model_class=model_class,
        dtype=dtype,
        attn_implementation=None if per_sub_model else attn,
    )
    attach_quantizer(model, config, location=source.location, index=index)
    logger.info(
        "Model initialized with attn_implementation=%r",
        model.config.get_text_config()._attn_implementation,
    )
    if source.exists("generation_config.json"):
        model.generation_config = GenerationConfig.from_dict(
            source.read_json("generation_config.json")
        )
    layout = adapter.layout(model)
    # a family adapter's key renamings and fused-tensor splits (rabbit_models.remote)
    conversions = getattr(adapter, "weight_conversions", None)
    weight_map = WeightMap(
        model,
        index,
        layers_prefix=layout.layers_prefix,
        num_layers=len(layout.layers),
        device=device,
        align=options.bit_exact,
        extra_conversions=conversions(model, index) if conversions is not None else (),
    )
    refuse_ignored_tensors(model, weight_map.unexpected, index)
    budget = resolve_budget(options.max_memory, device)
    resident = plan_residency(weight_map, len(layout.layers), budget, prefetch)
    profiler = Profiler(options.profile)
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
    contiguous_head_input(model)
    model.__class__ = streaming_class(type(model))
    model._rabbit_streamer = streamer
    model._rabbit_device = device
    model._rabbit_profiler = profiler
    return model
