"""Writing a compressed split: rabbit-store's splitter with a transform that packs each decoder
layer's linear weights (and fused MoE expert tensors) as the layer file is written.

Packing happens here, once, in the layout torch's CPU kernels take, so a token never pays for it.
The split machinery (atomic files, resume, lock, manifest, checksums) is rabbit-store's; this module
only says which tensors are compressed and produces their bytes (`SplitTransform`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PretrainedConfig

from rabbit_engine.config import load_config
from rabbit_engine.dtypes import (
    SAFETENSORS_DTYPES,
    SAFETENSORS_NAMES,
    checkpoint_dtype,
    tensor_bytes,
)
from rabbit_engine.errors import InvalidOptionError
from rabbit_engine.prequantized import is_prequantized
from rabbit_engine.quant.int4_layout import current_int4_layout
from rabbit_engine.quant.packing import INT8_LAYOUT, fits_kernel_shape, packed_specs, quantize
from rabbit_engine.skeleton import build_skeleton, causal_lm_class
from rabbit_engine.weights import key_renamer
from rabbit_store import CheckpointIndex, LayerPlan, Manifest, Source, TensorInfo, open_source
from rabbit_store.compression import (
    CompressedTensor,
    CompressionRecord,
    CompressionScheme,
    packed_names,
    parse_compression,
)
from rabbit_store.constants import TENSOR_ALIGNMENT
from rabbit_store.safetensors_header import DTYPE_BITS, tensor_nbytes
from rabbit_store.split import split_checkpoint
from rabbit_store.split.transform import PlannedTensor

__all__ = [
    "CompressTransform",
    "compress_checkpoint",
    "compression_plan",
    "scale_dtype_for",
    "scheme_for",
]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = ("BF16", "F16", "F32")
_SCALE_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def scale_dtype_for(dtype: torch.dtype) -> str:
    """Scales in the run dtype: the kernels want them so (a float64 run keeps float32 scales,
    the widest the kernels take)."""
    return _SCALE_DTYPE_NAMES.get(dtype, "float32")


def scheme_for(
    compression: str | CompressionScheme, dtype: torch.dtype, *, group_size: int | None = None
) -> CompressionScheme:
    """The scheme a run in `dtype` uses; a given scheme is taken as it is."""
    if isinstance(compression, CompressionScheme):
        if group_size is not None and group_size != compression.group_size:
            raise InvalidOptionError(
                f"group_size={group_size} contradicts the scheme {compression.name}",
                option="group_size",
            )
        return compression
    return parse_compression(compression, group_size=group_size, scale_dtype=scale_dtype_for(dtype))


def compression_plan(
    model: torch.nn.Module, index: CheckpointIndex, plan: LayerPlan, scheme: CompressionScheme
) -> dict[str, CompressedTensor]:
    """Which checkpoint tensors of the decoder layers are stored compressed, and how they load.

    "linear": the weight of an `nn.Linear` (runs on the packed kernel). "dequant": a tensor that
    becomes part of a 3-D expert stack (transformers 5 keeps MoE experts as [experts, out, in]
    parameters, per-expert checkpoint tensors are stacked by its converters), or the weight of an
    nn.Linear subclass whose forward we cannot take over: dequantized when its layer loads.
    Norms, biases, convolutions and shapes the scheme cannot pack stay as they are.
    """
    rename = key_renamer(model)
    meta = model.state_dict(keep_vars=True)
    chosen: dict[str, CompressedTensor] = {}
    skipped: list[str] = []
    for part, _, names in plan.groups():
        if part != "layer":
            continue
        for name in names:
            info = index.tensors[name]
            if info.dtype not in _FLOAT_DTYPES or len(info.shape) not in (2, 3):
                continue
            target, pattern = rename(name)
            mode = _mode(model, meta, target, pattern, len(info.shape))
            if mode is None:
                continue
            if not fits_kernel_shape(scheme, info.shape):
                skipped.append(name)
                continue
            chosen[name] = CompressedTensor(dtype=info.dtype, shape=tuple(info.shape), mode=mode)
    if skipped:
        logger.warning(
            "%d weight(s) stay uncompressed: their shape does not fit %s (%s%s)",
            len(skipped),
            scheme.name,
            ", ".join(skipped[:3]),
            "..." if len(skipped) > 3 else "",
        )
    return chosen


def _mode(
    model: torch.nn.Module,
    meta: dict[str, torch.Tensor],
    target: str,
    pattern: str | None,
    ndim: int,
) -> str | None:
    if target not in meta:
        return None
    if meta[target].ndim == 3:
        return "dequant"  # an expert stack (or a tensor stacked into one)
    if pattern is not None or ndim != 2 or not target.endswith(".weight"):
        return None
    try:
        module = model.get_submodule(target.removesuffix(".weight"))
    except AttributeError:
        return None
    if not isinstance(module, torch.nn.Linear):
        return None
    return "linear" if type(module) is torch.nn.Linear else "dequant"


class CompressTransform:
    """rabbit-store's `SplitTransform`: layer files hold packed tensors for the chosen weights."""

    def __init__(self, scheme: CompressionScheme, tensors: dict[str, CompressedTensor]) -> None:
        self.scheme = scheme
        self.tensors = tensors
        layout = INT8_LAYOUT if scheme.bits == 8 else current_int4_layout()
        self._record = CompressionRecord(scheme=scheme, layout=layout, tensors=tensors)

    @property
    def record(self) -> dict[str, Any]:
        return self._record.to_dict()

    def outputs(
        self, part: str, layer: int | None, infos: list[TensorInfo]
    ) -> list[PlannedTensor] | None:
        if not any(info.name in self.tensors for info in infos):
            return None
        planned = []
        for info in infos:
            if info.name not in self.tensors:
                planned.append(PlannedTensor(info.name, info.dtype, tuple(info.shape)))
                continue
            specs = packed_specs(self.scheme, tuple(info.shape))
            for name, part_name in zip(packed_names(info.name), ("qweight", "scales"), strict=True):
                shape, dtype = specs[part_name]
                planned.append(PlannedTensor(name, SAFETENSORS_NAMES[dtype], tuple(shape)))
        # Sizes that keep the next tensor 64-byte aligned first (the data starts aligned), then
        # widest dtype first, as the safetensors writer does, so every tensor stays aligned to
        # its element size. The loader copies any packed tensor that still lands unaligned.
        return sorted(
            planned,
            key=lambda t: (_nbytes(t) % TENSOR_ALIGNMENT != 0, -max(1, DTYPE_BITS[t.dtype] // 8)),
        )

    def produce(
        self,
        part: str,
        layer: int | None,
        infos: list[TensorInfo],
        read: Callable[[TensorInfo], memoryview | bytes],
    ) -> Iterator[bytes | memoryview]:
        data: dict[str, memoryview | bytes] = {}
        for info in infos:
            raw = read(info)
            if info.name not in self.tensors:
                data[info.name] = raw
                continue
            weight = _tensor(raw, info)
            packed = quantize(weight, self.scheme, name=info.name)
            qname, sname = packed_names(info.name)
            data[qname] = tensor_bytes(packed.qweight)
            data[sname] = tensor_bytes(packed.scales)
        for planned in self.outputs(part, layer, infos) or ():
            yield data.pop(planned.name)


def _nbytes(tensor: PlannedTensor) -> int:
    return tensor_nbytes(tensor.dtype, tensor.shape) or 0


def _tensor(raw: memoryview | bytes, info: TensorInfo) -> torch.Tensor:
    with warnings.catch_warnings():
        # a read-only map of the source: quantize only reads it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        flat = torch.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info.dtype])
    return flat.view(tuple(info.shape))


def compress_checkpoint(
    source: str | os.PathLike[str] | Source,
    dest: str | os.PathLike[str],
    compression: str | CompressionScheme,
    *,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    config: PretrainedConfig | None = None,
    progress: bool = True,
    token: str | None = None,
    revision: str | None = None,
    storage_options: dict[str, Any] | None = None,
    dest_storage_options: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    layer_prefix: str | None = None,
) -> Manifest:
    """Write a compressed split of `source` into `dest` (any fsspec URL) and return its manifest.

    Like `rabbit_store.split_checkpoint` (atomic, resumable, locked), but each decoder layer's
    linear weights are packed by `compression` ("8bit"/"int8" or "4bit"/"int4", `group_size` for
    4-bit) with scales in `dtype` (default: the checkpoint's). Embeddings, norms and the head are
    copied as they are.
    """
    src = (
        source
        if isinstance(source, Source)
        else open_source(source, revision=revision, token=token, storage_options=storage_options)
    )
    index = CheckpointIndex.load(src)
    if index.manifest is not None and index.manifest.compression is not None:
        done = index.manifest.compression_record()
        raise InvalidOptionError(
            f"{src.location} is already a compressed split ({done.scheme.name}); compress the "
            "original checkpoint instead.",
            option="compression",
        )
    config = config or load_config(src, trust_remote_code=trust_remote_code)
    if is_prequantized(config):
        raise InvalidOptionError(
            f"{src.location}/config.json has a quantization_config: the checkpoint is already "
            "quantized; compression= needs its unquantized original (or load it without "
            "compression=, which streams it as saved).",
            option="compression",
        )
    run_dtype = dtype or checkpoint_dtype(index)
    scheme = scheme_for(compression, run_dtype, group_size=group_size)
    skeleton = build_skeleton(
        config, model_class=causal_lm_class(config), dtype=run_dtype, attn_implementation="eager"
    )
    plan = LayerPlan.from_index(index, layer_prefix)
    tensors = compression_plan(skeleton, index, plan, scheme)
    if not tensors:
        raise InvalidOptionError(
            f"{src.location}: no decoder-layer weight can be compressed with {scheme.name} "
            f"(no nn.Linear or expert weight whose shape the scheme packs)",
            option="compression",
        )
    logger.info("compressing %d weights of %s to %s", len(tensors), src.location, scheme.name)
    return split_checkpoint(
        src,
        dest,
        dest_storage_options=dest_storage_options
        if dest_storage_options is not None
        else storage_options,
        layer_prefix=plan.layer_prefix,
        progress=progress,
        transform=CompressTransform(scheme, tensors),
    )
