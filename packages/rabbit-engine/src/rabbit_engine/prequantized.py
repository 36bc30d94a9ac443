"""Checkpoints saved already quantized (`quantization_config` in config.json).

Such a checkpoint stores packed integers or 8-bit floats plus scales that only its transformers
quantizer turns into weights. Streaming one without that quantizer would read the packed tensors as
if they were the weights: wrong numbers, sometimes without any error (an fp8 weight has the shape
of the bf16 one it replaces). So every quantization method is either run through transformers' own
quantizer, exactly as `from_pretrained` runs it, or refused by name before any weight is read.

Run: the methods whose transformers quantizer has a load-time dequantization, which transformers
itself falls back to on a CPU:
- fine-grained fp8 (`quant_method="fp8"`: DeepSeek-V3/R1, Qwen3 FP8, Mistral, MiniMax...): each
  fp8 weight times its block scales (`weight_scale_inv`), by transformers' `Fp8Dequantize`, per
  expert before a MoE's experts are fused;
- MXFP4 (`quant_method="mxfp4"`: gpt-oss as released): the packed fp4 expert `*_blocks` with
  their power-of-two `*_scales`, by transformers' `Mxfp4Dequantize`;
- weight-only compressed-tensors (llm-compressor's W4A16 / W8A16 / FP8-weight checkpoints), by
  transformers' `CompressedTensorsDequantize` (needs the compressed-tensors package, which
  transformers names when it is missing). Schemes that also quantize activations, the KV cache, or
  add sparsity or transforms are refused: dequantized weights alone would give other numbers than
  compressed-tensors' own modules.
We always take that path (`dequantize=True`): the quantizer then leaves the model's modules as they
are, and its weight conversions (transformers' `get_model_conversion_mapping(model,
hf_quantizer=...)`, which the weight map uses) turn each layer's packed bytes into run-dtype weights
when the layer is loaded. The layer files streamed are the packed ones (fp8: half the bytes of
bf16, W4A16 about a quarter), and the numbers are those of transformers' own model, bit for bit
(tests/engine/test_prequantized.py). On a GPU with fp8/mxfp4 kernels transformers would instead
keep the weights packed and run those kernels; this engine dequantizes there too (unverified on a
GPU). A transformers without such a dequantization for the method (5.0 has none for
compressed-tensors, and its fp8 one imports triton) is refused, naming the version.

Refused: every other method (GPTQ, AWQ, bitsandbytes, torchao, HQQ, quanto...): their quantizers
load packed weights into their own module types or tensor subclasses, mostly with kernels for
CUDA, which the streaming engine does not swap in and out. The error names the method and what it
would need.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from rabbit_engine.errors import UnsupportedModelError, WeightMismatchError
from rabbit_store import CheckpointIndex
from rabbit_store.errors import InvalidCheckpointError

logger = logging.getLogger(__name__)

# quant_method -> what the checkpoint would need, for the methods users meet most often. Others
# get a generic reason.
_REFUSED: dict[str, str] = {
    "gptq": "GPTQ's packed int4 weights load only into gptqmodel's QuantLinear modules (the "
    "gptqmodel package, kernels mostly for CUDA)",
    "awq": "AWQ's packed int4 weights load only into gptqmodel's or autoawq's modules (kernels "
    "mostly for CUDA)",
    "bitsandbytes": "bitsandbytes' Linear4bit/Linear8bitLt keep their weights in bitsandbytes' "
    "own parameter types (the bitsandbytes package)",
    "torchao": "torchao keeps weights as its own tensor subclasses (the torchao package)",
    "hqq": "HQQ keeps weights in its own HQQLinear modules (the hqq package)",
    "quanto": "quanto keeps weights in its own QLinear modules (the optimum-quanto package)",
    "fbgemm_fp8": "fbgemm fp8 runs only through fbgemm-gpu's CUDA kernels",
    "metal": "Metal checkpoints are made for Apple GPUs and not verified here",
}
SUPPORTED_METHODS = ("fp8", "mxfp4", "compressed-tensors")


def quantization_config_of(data: Mapping[str, Any]) -> Any:
    """The raw `quantization_config` of a config.json dict, top level or in a sub-config (a
    multimodal model's `text_config`), where transformers' `get_hf_quantizer` looks for it."""
    if data.get("quantization_config"):
        return data["quantization_config"]
    for value in data.values():
        if isinstance(value, dict) and "model_type" in value and value.get("quantization_config"):
            return value["quantization_config"]
    return None


def check_prequantized(location: str, data: Mapping[str, Any]) -> None:
    """Refuse, from config.json alone, a quantization this engine does not run, or a malformed
    `quantization_config`; let a supported one through (it is parsed here once, so a bad field
    is reported as the checkpoint's fault, not as a traceback from deep inside loading)."""
    quant = quantization_config_of(data)
    if quant is None:
        return
    where = f"{location}/config.json: quantization_config"
    if not isinstance(quant, dict):
        raise InvalidCheckpointError(
            f"{where} is {type(quant).__name__} {quant!r}, not a JSON object with a 'quant_method'."
        )
    method = quant.get("quant_method")
    if quant.get("load_in_4bit") or quant.get("load_in_8bit"):
        method = method or "bitsandbytes"
    if not isinstance(method, str) or not method:
        raise InvalidCheckpointError(
            f"{where} has no 'quant_method' (got {method!r}); the checkpoint's quantization cannot "
            "be identified, so its tensors cannot be read as weights."
        )
    if method not in SUPPORTED_METHODS:
        reason = _REFUSED.get(method, "transformers' quantizer for it is not run by this engine")
        raise UnsupportedModelError(
            f"{where} (quant_method={method!r}): this checkpoint was saved pre-quantized and "
            f"RabbitLLM cannot stream it: {reason}. Pre-quantized methods it streams: "
            f"{', '.join(SUPPORTED_METHODS)}. Use the checkpoint's unquantized original "
            "(and `compression=` for smaller layers)."
        )
    _quantizer(where, quant)


def _quantizer(where: str, quant: dict) -> Any:
    """transformers' own quantizer for `quant`, in dequantize mode, shown to run here.

    Its config's validation errors become ours (the checkpoint's fault, named), and so does a
    quantizer that cannot run in this environment: transformers 5.0's fp8 integration imports
    triton (a GPU compiler) at module level, so even its CPU dequantization fails there. Building
    the weight conversions is what imports the integration, so it is done here, before any weight
    is read."""
    import transformers
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    try:
        qconfig = AutoQuantizationConfig.from_dict(dict(quant))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidCheckpointError(f"{where} is malformed: {exc}") from None
    qconfig.dequantize = True
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        _check_weight_only(where, quant)
    version = f"transformers {transformers.__version__}"
    try:
        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=True)
        quantizer.validate_environment(device_map=None, weights_only=True)
        conversions = quantizer.get_weight_conversions()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidCheckpointError(f"{where} is malformed: {exc}") from None
    except (ImportError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"{where} (quant_method={method!r}): {version}'s quantizer for this pre-quantized "
            f"checkpoint does not run here ({exc}). Install what it names, or use a transformers "
            f"that dequantizes it on a CPU (5.24 does for {', '.join(SUPPORTED_METHODS)}), or the "
            "checkpoint's unquantized original."
        ) from None
    if not conversions:
        # The streaming engine swaps plain weights in and out of transformers' own modules; a
        # quantizer without a load-time dequantization would need its own module types instead.
        raise UnsupportedModelError(
            f"{where} (quant_method={method!r}): {version} has no load-time dequantization for "
            f"this pre-quantized checkpoint (5.24 has one for {', '.join(SUPPORTED_METHODS)}); "
            "upgrade transformers, or use the checkpoint's unquantized original."
        )
    return quantizer


def _check_weight_only(where: str, quant: dict) -> None:
    """compressed-tensors: only weight-only schemes dequantize to what transformers computes.

    transformers' own default loading keeps compressed-tensors' modules, which also quantize
    activations (W8A8, FP8-dynamic...), the KV cache, or apply sparsity and transforms as the
    config says; dequantized weights alone would silently give other numbers for those."""
    groups = quant.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise InvalidCheckpointError(f"{where}.config_groups is not a JSON object.")
    for name, group in groups.items():
        for field in ("input_activations", "output_activations"):
            if isinstance(group, dict) and group.get(field):
                raise UnsupportedModelError(
                    f"{where}.config_groups.{name}.{field} quantizes activations "
                    "(quant_method='compressed-tensors'): RabbitLLM streams only weight-only "
                    "compressed-tensors checkpoints (W4A16, W8A16, FP8 weights), whose weights it "
                    "dequantizes; activation quantization needs compressed-tensors' own modules."
                )
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quant.get(field):
            raise UnsupportedModelError(
                f"{where}.{field} is set (quant_method='compressed-tensors'): RabbitLLM streams "
                "only weight-only compressed-tensors checkpoints, whose weights it dequantizes; "
                f"{field} needs compressed-tensors' own modules."
            )


def is_prequantized(config: PretrainedConfig) -> bool:
    """Whether transformers would load `config`'s checkpoint through a quantizer."""
    return _config_quantization(config) is not None


def _config_quantization(config: PretrainedConfig) -> Any:
    quant = getattr(config, "quantization_config", None)
    if not quant:
        quant = getattr(config.get_text_config(decoder=True), "quantization_config", None)
    return quant or None


def attach_quantizer(
    model: PreTrainedModel,
    config: PretrainedConfig,
    *,
    location: str,
    index: CheckpointIndex | None = None,
) -> None:
    """Run the checkpoint's transformers quantizer on the meta skeleton, as `from_pretrained` does
    before loading weights, in dequantize mode; `model.hf_quantizer` is what the weight map takes
    its weight conversions from. No-op for a checkpoint saved unquantized.

    A compressed split (`index` with a compression manifest) of a pre-quantized checkpoint is
    refused: its compressor read the packed tensors as weights, so its numbers are wrong."""
    quant = _config_quantization(config)
    if quant is None:
        return
    manifest = index.manifest if index is not None else None
    if manifest is not None and manifest.compression is not None:
        raise UnsupportedModelError(
            f"{index.source.location}: a compressed split of a pre-quantized checkpoint (its "
            "config.json has a quantization_config): compression reads every linear weight as a "
            "float weight, which a pre-quantized checkpoint does not store. Stream the "
            "pre-quantized checkpoint without compression."
        )
    raw = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant)
    check_prequantized(location, {"quantization_config": raw})  # a config not from load_config
    quantizer = _quantizer(f"{location}/config.json: quantization_config", raw)
    try:
        quantizer.preprocess_model(model=model, dtype=model.dtype, device_map=None)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidCheckpointError(
            f"{location}/config.json: quantization_config does not fit this model: {exc}"
        ) from None
    model.hf_quantizer = quantizer
    logger.info(
        "%s: %s pre-quantized checkpoint, dequantized to %s by transformers' quantizer as each "
        "layer loads",
        location,
        quantizer.quantization_config.quant_method,
        model.dtype,
    )


def refuse_ignored_tensors(
    model: PreTrainedModel, unexpected: list[str], index: CheckpointIndex
) -> None:
    """A pre-quantized checkpoint's tensors must all be used: a scale or packed tensor that the
    quantizer's conversions did not claim (a quantization_config that does not describe these
    tensors) would leave weights unscaled, loading without an error. An unquantized checkpoint
    only warns (the weight map logs what it ignores)."""
    if quantizer_of(model) is None or not unexpected:
        return
    method = quantizer_of(model).quantization_config.quant_method
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    files = sorted({index.tensors[key].file for key in unexpected})
    raise WeightMismatchError(
        f"{index.source.location}: {len(unexpected)} tensor(s) of this pre-quantized checkpoint "
        f"have no place in the model as its quantization_config (quant_method={method!r}) "
        f"describes it: {', '.join(unexpected[:6])} (in {', '.join(files[:3])}). Is config.json "
        "the one this checkpoint was saved with?"
    )


def quantizer_of(model: torch.nn.Module) -> Any:
    """The transformers quantizer attached to `model` by `attach_quantizer`, or None."""
    return getattr(model, "hf_quantizer", None)
