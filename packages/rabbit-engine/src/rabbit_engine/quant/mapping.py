"""Fitting a compressed split onto transformers' model: which linears run packed, which tensors
are dequantized when their layer loads.

A compressed split records, for each compressed checkpoint tensor, its original dtype and shape
(`rabbit_store.compression.CompressionRecord`). At load, each one whose checkpoint key renames to
the `weight` of a plain `nn.Linear` inside a decoder layer (and the device is the CPU, where torch's
packed kernels run) has its module replaced by `CompressedLinear`, and its two stored tensors fill
that module's `qweight`/`scales` buffers directly. Every other compressed tensor (fused MoE expert
stacks, per-expert tensors transformers combines at load, linears on a device without a kernel) is
dequantized to its original dtype in the prefetch thread and then loaded exactly as the original
tensor would have been, converters and all. The split's recorded mode is only the writer's
expectation: the reader decides from the model it built, so a transformers version that names a
module differently degrades to dequantization, never to a wrong mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from rabbit_engine.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES, tensor_bytes
from rabbit_engine.errors import WeightMismatchError
from rabbit_engine.quant.compute import repack_int4
from rabbit_engine.quant.dequant import dequantize
from rabbit_engine.quant.int4_layout import INT4_LAYOUTS, current_int4_layout
from rabbit_engine.quant.linear import CompressedLinear
from rabbit_engine.quant.packing import (
    INT8_LAYOUT,
    PackedWeight,
    fits_kernel_shape,
    packed_specs,
)
from rabbit_store import CheckpointIndex, TensorInfo
from rabbit_store.compression import CompressionRecord, CompressionSchemeError, packed_names
from rabbit_store.constants import MANIFEST_FILE

__all__ = ["CompressedLayers", "Entry"]

logger = logging.getLogger(__name__)

#: key -> (target name, transformers' converter pattern or None): WeightMap's renaming.
Rename = Callable[[str], tuple[str, str | None]]


@dataclass(frozen=True)
class Entry:
    """One tensor as the weight map sees it: `key` with `info`, read from `reads`, mapped onto
    `target` when the name is decided here (None: by transformers' renaming)."""

    key: str
    info: TensorInfo
    reads: tuple[str, ...]
    target: str | None = None


@dataclass(frozen=True)
class _Packed:
    key: str  # the original checkpoint key
    qweight: str
    scales: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the original's


class CompressedLayers:
    """The compressed tensors of one model: built once at load, consulted per layer read."""

    def __init__(self, record: CompressionRecord) -> None:
        self.record = record
        self.swapped: dict[str, str] = {}  # original key -> the CompressedLinear's module name
        self._dequant: dict[str, _Packed] = {}  # qweight name -> what it decodes to
        self._repack: dict[str, _Packed] = {}  # qweight of a swapped linear in a foreign layout

    @classmethod
    def attach(
        cls,
        model: torch.nn.Module,
        index: CheckpointIndex,
        record: CompressionRecord,
        rename: Rename,
        *,
        owner: Callable[[str], int],
        device: torch.device,
    ) -> CompressedLayers:
        """Swap the linears that run packed into `model` (before its state dict is mapped)."""
        self = cls(record)
        scheme = record.scheme
        known = (INT8_LAYOUT,) if scheme.bits == 8 else INT4_LAYOUTS
        if record.layout not in known:
            # Checked here, not when a layer is first read: an unknown byte order would otherwise
            # fail in the prefetch thread (4-bit) or be read as int8:nk, i.e. wrong (8-bit).
            raise CompressionSchemeError(
                f"{index.source.location}/{MANIFEST_FILE}: compression field 'layout': "
                f"{record.layout!r} is not a {scheme.name} layout this version reads (known: "
                f"{', '.join(known)}); split the checkpoint again with this RabbitLLM",
                field="layout",
            )
        layout = INT8_LAYOUT if scheme.bits == 8 else current_int4_layout()
        for key, tensor in record.tensors.items():
            qname, sname = packed_names(key)
            for name in (qname, sname):
                if name not in index.tensors:
                    raise WeightMismatchError(
                        f"{index.source.location}: the compressed split records {key!r} but has "
                        f"no tensor {name!r}; the split is incomplete: write it again."
                    )
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise WeightMismatchError(
                    f"{index.tensors[qname].file}: compressed tensor {key!r} records dtype "
                    f"{tensor.dtype}, which torch cannot load."
                )
            _check_stored(index, record, key)
            packed = _Packed(
                key, qname, sname, tuple(tensor.shape), SAFETENSORS_DTYPES[tensor.dtype]
            )
            module_name = self._linear_module(model, key, tensor.shape, rename, owner, device)
            if module_name is None:
                self._dequant[qname] = packed
                continue
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)
            setattr(parent, child, CompressedLinear(linear, scheme, layout))
            self.swapped[key] = module_name
            if scheme.bits == 4 and record.layout != layout:
                self._repack[qname] = packed
        if self._dequant:
            logger.info(
                "%d compressed tensor(s) are dequantized as their layer loads (no packed kernel "
                "for them here), %d linear(s) run packed",
                len(self._dequant),
                len(self.swapped),
            )
        if self._repack:
            logger.warning(
                "%s was packed for %s; this CPU's int4 kernel wants %s: repacking each layer as it "
                "loads (in the prefetch thread). Write the split on this machine to skip it.",
                index.source.location,
                record.layout,
                layout,
            )
        return self

    @staticmethod
    def _linear_module(
        model: torch.nn.Module,
        key: str,
        shape: tuple[int, ...],
        rename: Rename,
        owner: Callable[[str], int],
        device: torch.device,
    ) -> str | None:
        """The module name of the plain nn.Linear `key` is the weight of, in a decoder layer, if
        a packed kernel can run it here; else None (the tensor is dequantized at load)."""
        if device.type != "cpu" or len(shape) != 2:
            return None
        target, pattern = rename(key)
        if pattern is not None or not target.endswith(".weight") or owner(target) < 0:
            return None
        module_name = target.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        if type(module) is not torch.nn.Linear or tuple(module.weight.shape) != tuple(shape):
            return None
        return module_name

    # ---- what the weight map reads -----------------------------------------------------------
    def entries(self, index: CheckpointIndex) -> Iterator[Entry]:
        """The index's tensors as the weight map should map them: packed tensors of a swapped
        linear onto its buffers, those of a dequantized tensor as the original tensor."""
        targets = {
            name: f"{self.swapped[key]}.{part}"
            for key in self.swapped
            for name, part in zip(packed_names(key), ("qweight", "scales"), strict=True)
        }
        scales_of_dequant = {p.scales for p in self._dequant.values()}
        for name, info in index.tensors.items():
            if name in targets:
                yield Entry(name, info, (name,), targets[name])
            elif name in self._dequant:
                packed = self._dequant[name]
                logical = TensorInfo(
                    packed.key,
                    info.file,
                    SAFETENSORS_NAMES[packed.dtype],
                    packed.shape,
                    info.offset,
                    0,  # not a span of any file: the bytes read are the two packed tensors'
                )
                yield Entry(packed.key, logical, (packed.qweight, packed.scales))
            elif name not in scales_of_dequant:
                yield Entry(name, info, (name,))

    def decode(self, raw: Mapping[str, memoryview]) -> dict[str, memoryview]:
        """`raw` with each dequantized tensor added under its original key, and each foreign int4
        layout repacked. Runs in the prefetch thread (or once at load for resident layers)."""
        out = dict(raw)
        for name in raw:
            packed = self._dequant.get(name)
            if packed is not None:
                weight = dequantize(self._packed(packed, raw), dtype=packed.dtype)
                out[packed.key] = tensor_bytes(weight)
                continue
            packed = self._repack.get(name)
            if packed is not None:
                out[name] = tensor_bytes(repack_int4(self._packed(packed, raw)).qweight)
        return out

    @property
    def decodes(self) -> bool:
        """Whether reading a layer needs work beyond views (dequantizing or repacking)."""
        return bool(self._dequant or self._repack)

    def _packed(self, packed: _Packed, raw: Mapping[str, memoryview]) -> PackedWeight:
        specs = packed_specs(self.record.scheme, packed.shape)
        tensors = {}
        for part, name in (("qweight", packed.qweight), ("scales", packed.scales)):
            shape, dtype = specs[part]
            tensors[part] = torch.frombuffer(raw[name], dtype=dtype).view(shape)
        return PackedWeight.from_tensors(
            self.record.scheme, packed.shape, self.record.layout, tensors, name=packed.key
        )


def _check_stored(index: CheckpointIndex, record: CompressionRecord, key: str) -> None:
    """The two stored tensors of `key` must be what its recorded shape packs to: a record that
    disagrees with its files would otherwise fail deep in the prefetch thread at the first token
    (a bare RuntimeError from a view), or be read as another shape."""
    scheme, shape = record.scheme, tuple(record.tensors[key].shape)
    where = f"{index.source.location}/{MANIFEST_FILE}"
    if len(shape) not in (2, 3) or not fits_kernel_shape(scheme, shape):
        raise WeightMismatchError(
            f"{where}: compressed tensor {key!r} records shape {list(shape)}, which "
            f"{scheme.name} cannot pack; the manifest is damaged: write the split again."
        )
    specs = packed_specs(scheme, shape)
    for (want_shape, want_dtype), name in zip(specs.values(), packed_names(key), strict=True):
        info = index.tensors[name]
        want = (SAFETENSORS_NAMES[want_dtype], tuple(want_shape))
        if (info.dtype, tuple(info.shape)) != want:
            raise WeightMismatchError(
                f"{info.file}: {name!r} is {info.dtype} {list(info.shape)}, but {where} records "
                f"{key!r} as {list(shape)}, which {scheme.name} stores as {want[0]} "
                f"{list(want[1])}; the split and its manifest disagree: write the split again."
            )
