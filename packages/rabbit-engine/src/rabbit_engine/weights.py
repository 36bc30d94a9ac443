"""Mapping checkpoint tensors onto the skeleton's parameters, one group (a decoder layer, or the
resident parts) at a time.

transformers 5 renames and converts checkpoint keys at load time for some families (Mixtral's
per-expert `w1/w3` become the fused `mlp.experts.gate_up_proj`). We reuse its mapping: keys are
renamed with `transformers.core_model_loading.rename_source_key` once, at build time. Keys that only
need a rename take the hot path below (a zero-copy `torch.frombuffer` view, cast only when the dtype
differs); keys that a `WeightConverter` must combine go through transformers' own
`convert_and_load_state_dict_in_model`, restricted to that group's tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from rabbit_engine.dtypes import SAFETENSORS_DTYPES
from rabbit_engine.errors import WeightMismatchError
from rabbit_engine.prequantized import quantizer_of
from rabbit_engine.quant.mapping import CompressedLayers, Entry
from rabbit_engine.readahead import mapped_range, mapped_spans, unmap
from rabbit_engine.staging import CudaStager
from rabbit_store import CheckpointIndex, LayerReader, TensorInfo
from rabbit_store.constants import TENSOR_ALIGNMENT

logger = logging.getLogger(__name__)

RESIDENT = -1  # group id of everything outside the decoder-layer list (embeddings, norm, head...)
# what torch's CPU allocator guarantees; oneDNN's fast paths and the packed kernels assume it
ALIGNMENT = TENSOR_ALIGNMENT


@dataclass(frozen=True)
class Slot:
    """One model tensor filled from exactly one checkpoint tensor (rename only)."""

    key: str  # checkpoint key
    target: str  # the model's state-dict name
    module: torch.nn.Module
    attr: str
    is_buffer: bool
    src_dtype: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype transformers gave this tensor in the skeleton
    packed: bool = False  # a compressed linear's qweight/scales: the kernels need it aligned


@dataclass
class Group:
    """The tensors read and the module tensors filled together (one decoder layer, or the resident
    parts)."""

    gid: int
    keys: list[str] = field(default_factory=list)  # every checkpoint key this group reads
    slots: list[Slot] = field(default_factory=list)  # rename-only keys
    converted: list[str] = field(default_factory=list)  # keys a WeightConverter combines
    targets: dict[str, tuple[torch.nn.Module, str, torch.Tensor]] = field(default_factory=dict)
    # target name -> (module, attribute, its meta placeholder), to release the weights afterwards

    @property
    def name(self) -> str:
        return (
            "the resident parts (embeddings, norm, head)"
            if self.gid == RESIDENT
            else f"decoder layer {self.gid}"
        )


def _owner(target: str, layers_prefix: str) -> int:
    if target.startswith(layers_prefix + "."):
        head = target[len(layers_prefix) + 1 :].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return RESIDENT


def _locate(model: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    module_path, _, attr = target.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


def key_renamer(
    model: PreTrainedModel, mapping: list | None = None
) -> Callable[[str], tuple[str, str | None]]:
    """checkpoint key -> (the model's name for it, the converter pattern that combines it or
    None), by transformers' own renaming for this model (`mapping`: its conversion mapping)."""
    if mapping is None:  # a pre-quantized checkpoint's quantizer adds its (de)serializing ops
        mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer_of(model))
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    names = model.state_dict(keep_vars=True)

    def rename(key: str) -> tuple[str, str | None]:
        target, pattern = rename_source_key(
            key, renamings, converters, model.base_model_prefix, names
        )
        if target not in names and key in names:
            return key, None
        return target, pattern

    return rename


class WeightMap:
    """Built once per model: which checkpoint keys fill which module tensors, grouped by layer."""

    def __init__(
        self,
        model: PreTrainedModel,
        index: CheckpointIndex,
        *,
        layers_prefix: str,
        num_layers: int,
        device: torch.device,
        align: bool = False,
        extra_conversions: Sequence[WeightRenaming | WeightConverter] = (),
    ) -> None:
        """`extra_conversions` go before transformers' own mapping for the model: a family
        adapter's renamings and splits of keys transformers does not know."""
        self.model = model
        self.index = index
        self.device = device
        self.align = align
        self.groups: dict[int, Group] = {gid: Group(gid) for gid in [RESIDENT, *range(num_layers)]}
        self._mapping = [
            *extra_conversions,
            *get_model_conversion_mapping(model, hf_quantizer=quantizer_of(model)),
        ]
        converters = [t for t in self._mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta_sd = model.state_dict(keep_vars=True)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        self.unexpected: list[str] = []
        covered: set[str] = set()

        rename = key_renamer(model, self._mapping)
        self.compressed: CompressedLayers | None = None
        record = index.manifest.compression_record() if index.manifest is not None else None
        if record is not None:
            # Compressed linears are swapped in before the model's tensors are listed.
            self.compressed = CompressedLayers.attach(
                model,
                index,
                record,
                rename,
                owner=lambda target: _owner(target, layers_prefix),
                device=device,
            )
            meta_sd = model.state_dict(keep_vars=True)
            entries = self.compressed.entries(index)
        else:
            entries = (Entry(k, info, (k,)) for k, info in index.tensors.items())
        self._infos: dict[str, TensorInfo] = {}  # every key a group maps, as the model sees it

        for entry in entries:
            key, info = entry.key, entry.info
            target, pattern = (entry.target, None) if entry.target else rename(key)
            if target not in meta_sd:
                self.unexpected.append(key)
                continue
            group = self.groups[_owner(target, layers_prefix)]
            if group.gid >= num_layers:
                raise WeightMismatchError(
                    f"{info.file}: tensor {key!r} belongs to layer {group.gid}, "
                    f"but the config has {num_layers} layers."
                )
            group.keys.extend(entry.reads)
            self._infos[key] = info
            if pattern is not None:
                group.converted.append(key)
                conv = by_pattern[pattern]
                covered.update(
                    target.replace(conv.target_patterns[0], t) for t in conv.target_patterns
                )
                continue
            covered.add(target)
            expected = meta_sd[target]
            if tuple(expected.shape) != tuple(info.shape):
                raise WeightMismatchError(
                    f"{info.file}: tensor {key!r} has shape {list(info.shape)}, but the config "
                    f"implies {list(expected.shape)} for {target!r}. Is config.json the one this "
                    "checkpoint was saved with?"
                )
            if info.dtype not in SAFETENSORS_DTYPES:
                raise WeightMismatchError(
                    f"{info.file}: tensor {key!r} has dtype {info.dtype}, which torch cannot load."
                )
            module, attr = _locate(model, target)
            group.slots.append(
                Slot(
                    key,
                    target,
                    module,
                    attr,
                    attr in module._buffers,
                    SAFETENSORS_DTYPES[info.dtype],
                    tuple(info.shape),
                    expected.dtype,
                    packed=entry.target is not None,
                )
            )

        if self.unexpected:
            logger.warning(
                "Ignoring %d checkpoint tensor(s) the model has no place for: %s",
                len(self.unexpected),
                ", ".join(self.unexpected[:8]),
            )
        for target, tensor in meta_sd.items():
            if not tensor.is_meta:
                continue  # a real buffer computed by the model itself (rotary inv_freq...)
            group = self.groups[_owner(target, layers_prefix)]
            module, attr = _locate(model, target)
            group.targets[target] = (module, attr, tensor)
            if target not in covered and target not in tied:
                raise WeightMismatchError(
                    f"The checkpoint has no tensor for {target!r} ({group.name}); "
                    "the checkpoint is incomplete or was not saved for this config."
                )
        # Tied targets (lm_head.weight when tie_word_embeddings) are filled by re-tying, not a read.
        for target in tied & set(meta_sd):
            if target not in covered:
                self.groups[_owner(target, layers_prefix)].targets.pop(target, None)
        self._tied_missing = bool(tied - covered)

    # ---- sizes -------------------------------------------------------------------------------
    def nbytes(self, gid: int) -> int:
        """Bytes read from storage for this group."""
        return sum(self.index.tensors[k].nbytes for k in self.groups[gid].keys)

    def loaded_nbytes(self, gid: int) -> int:
        """Bytes the group's tensors occupy once materialized in the run dtype."""
        total = 0
        for _, _, meta in self.groups[gid].targets.values():
            total += meta.numel() * meta.element_size()
        return total

    # ---- the hot path ------------------------------------------------------------------------
    def decode(self, raw: Mapping[str, memoryview]) -> Mapping[str, memoryview]:
        """The bytes read, with compressed tensors that do not run packed dequantized (and foreign
        int4 layouts repacked): real work, so prefetch strategies call it in their worker thread.
        Identity for an uncompressed checkpoint."""
        return raw if self.compressed is None else self.compressed.decode(raw)

    def materialize(
        self, gid: int, raw: Mapping[str, memoryview], stager: CudaStager | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Tensors for the group's rename-only slots, and the CUDA event they are ready at.

        CPU: views over `raw` (zero copy), cast only when the run dtype differs; with `align`, a
        view that is not 64-byte aligned is copied (oneDNN takes another vector path for unaligned
        weights, which changes float32 results by a few ulps). CUDA with a stager: one pinned,
        asynchronous transfer per layer on a side stream.
        """
        slots = self.groups[gid].slots
        if stager is not None:
            staged = stager.stage(
                [(s.key, raw[s.key], s.src_dtype, s.shape, s.dtype) for s in slots]
            )
            return staged.tensors, staged.ready
        out: dict[str, torch.Tensor] = {}
        for slot in slots:
            buf = raw[slot.key]
            if len(buf) == 0:
                tensor = torch.empty(slot.shape, dtype=slot.src_dtype)
            else:
                tensor = torch.frombuffer(buf, dtype=slot.src_dtype).view(slot.shape)
            if tensor.dtype != slot.dtype or tensor.device != self.device:
                tensor = tensor.to(device=self.device, dtype=slot.dtype)
            elif (self.align or slot.packed) and tensor.data_ptr() % ALIGNMENT:
                # torch's packed kernels crash on weights that are not 16-byte aligned (measured:
                # a general protection fault at 8 mod 64); splits we write align them, so this
                # copy only happens for files written otherwise.
                tensor = tensor.clone()
            out[slot.key] = tensor
        return out, None

    def assign(
        self, gid: int, tensors: Mapping[str, torch.Tensor], raw: Mapping[str, memoryview]
    ) -> None:
        """Put the group's weights into the modules; converter keys go through transformers."""
        group = self.groups[gid]
        for slot in group.slots:
            tensor = tensors[slot.key]
            if slot.is_buffer:
                slot.module._buffers[slot.attr] = tensor
            else:
                slot.module._parameters[slot.attr] = torch.nn.Parameter(tensor, requires_grad=False)
        if group.converted:
            self._convert_with_transformers(group, raw)
        if gid == RESIDENT and self._tied_missing:
            self.model.tie_weights()

    def release(self, gid: int) -> None:
        """Swap the group's weights back for meta placeholders so their memory can go."""
        for module, attr, meta in self.groups[gid].targets.values():
            if attr in module._buffers:
                module._buffers[attr] = meta
            else:
                module._parameters[attr] = meta

    def own(self, gids: Iterable[int], reader: LayerReader) -> None:
        """Copy these groups' CPU weights out of the reader's mapped files into memory we own.

        For groups kept for the model's life (the resident parts, resident layers). A view over a
        mapped file is only as resident as the page cache lets it be: once the streamed layers
        fill memory (a model larger than RAM, or a memory cap), the kernel evicts the head and
        embeddings like any other file page and the compute thread re-reads them every token, in
        page faults nothing overlaps (measured under a 1.41 GiB cap: ~170 MiB per token faulted in
        by compute for a 262 MB head + embeddings). Anonymous copies stay; they are what the memory
        budget counted anyway. Tied parameters stay tied (one copy per source tensor, and every
        holder re-pointed to it), and the copied file pages are unmapped.
        """
        groups = [self.groups[gid] for gid in gids]
        files = {self.index.tensors[key].file for group in groups for key in group.keys}
        if not any(reader.is_local(file) for file in files):
            return  # remote reads already own their memory (CUDA tensors are skipped below)
        maps = [mapped_range(m) for f in files if (m := reader.mapping(f)) is not None]
        copies: dict[int, torch.nn.Parameter | torch.Tensor] = {}
        originals = []  # alive until every holder is swapped, so their ids stay unique
        targets = (target for group in groups for target in group.targets.values())
        for module, attr, _ in targets:
            old = getattr(module, attr)
            if old.is_meta or old.device.type != "cpu" or id(old) in copies:
                continue
            if not any(old.data_ptr() in span for span in maps):
                continue  # already our own memory (a cast, an alignment copy, a dequantization)
            originals.append(old)
            data = old.detach().clone()
            copies[id(old)] = (
                torch.nn.Parameter(data, requires_grad=False)
                if isinstance(old, torch.nn.Parameter)
                else data
            )
        # Every holder of a copied tensor (a tied head is not among the group's targets), in one
        # walk over the model for all the groups
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for name, value in table.items():
                    if value is not None and id(value) in copies:
                        table[name] = copies[id(value)]
        del originals
        # The file pages just copied no longer need to be mapped (nor counted in our RSS). Tensor
        # by tensor, not the group's span: streamed layers' bytes may lie between resident ones.
        tensors = (self.index.tensors[key] for group in groups for key in group.keys)
        unmap(mapped_spans(reader, ((t.file, t.offset, t.offset + t.nbytes) for t in tensors)))

    # ---- transformers' conversion path -------------------------------------------------------
    def _convert_with_transformers(self, group: Group, raw: Mapping[str, memoryview]) -> None:
        state_dict = {}
        for key in group.converted:
            info: TensorInfo = self._infos[key]
            buf = raw[key]
            dtype = SAFETENSORS_DTYPES[info.dtype]
            tensor = (
                torch.frombuffer(buf, dtype=dtype).view(tuple(info.shape))
                if len(buf)
                else torch.empty(tuple(info.shape), dtype=dtype)
            )
            if self.align and tensor.data_ptr() % ALIGNMENT:
                tensor = tensor.clone()  # some conversions (renames, transposes) keep views
            state_dict[key] = tensor
        config = LoadStateDictConfig(
            device_map={"": str(self.device)},
            weight_mapping=self._mapping,
            hf_quantizer=quantizer_of(self.model),  # keeps packed tensors uncast for its ops
        )
        with _quiet_transformers():
            if "tp_plan" in inspect.signature(convert_and_load_state_dict_in_model).parameters:
                convert_and_load_state_dict_in_model(
                    self.model, state_dict, config, None
                )  # transformers 5.0.x
            else:
                convert_and_load_state_dict_in_model(self.model, state_dict, config)
        still_meta = [t for t, (m, a, _) in group.targets.items() if getattr(m, a).is_meta]
        if still_meta:
            raise WeightMismatchError(
                f"transformers' weight conversion left {', '.join(still_meta[:4])} unloaded in "
                f"{group.name}: the checkpoint's tensors do not match the shapes this config "
                "implies."
            )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws a 'Loading weights' bar per call: one per streamed layer is noise."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
