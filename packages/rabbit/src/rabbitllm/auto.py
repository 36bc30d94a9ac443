"""`AutoModel.from_pretrained`: the one entry point, mirroring transformers' conventions."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from typing import Any

from transformers import PreTrainedModel

from rabbit_engine import load_config, load_streaming_model
from rabbit_engine.errors import InvalidOptionError, PickleRefusedError, WeightMismatchError
from rabbit_engine.options import StreamingOptions
from rabbit_engine.pickle_import import convert_pickle_checkpoint, pickle_files
from rabbit_engine.quant.cache import compressed_source
from rabbit_models import adapter_for
from rabbit_models.remote import translate_config
from rabbit_models.support import refuse_unsupported
from rabbit_store import CheckpointIndex, open_source
from rabbit_store.constants import MANIFEST_FILE, cache_root
from rabbit_store.errors import CheckpointNotFoundError
from rabbit_store.verify import differing_copies

logger = logging.getLogger(__name__)


class AutoModel:
    """Not instantiated: `from_pretrained` returns transformers' own model class with streaming
    attached."""

    def __init__(self) -> None:
        raise TypeError("Use AutoModel.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        token: str | bool | None = None,
        revision: str | None = None,
        storage_options: dict[str, Any] | None = None,
        layers_path: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        local_cache: bool | str = False,
        allow_pickle: bool = False,
        verify: bool = False,
        options: StreamingOptions | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load `source` (local dir, hub id, or fsspec URL) for layer streaming.

        How the model streams is `StreamingOptions` (rabbit_engine.options): pass its fields as
        keywords like transformers' own (`device=`, `dtype=`, `attn_implementation=`,
        `max_memory=`, `prefetch=`, `profile=`, `bit_exact=`, `compression=`, `group_size=`), or a
        built `options=` object (the CLI and the bench do); keywords given beside `options`
        override its fields.

        `compression="8bit"|"4bit"` (also "int8"/"int4") streams the decoder layers' linear
        weights packed (int8 per output channel; int4 in groups of `group_size` input features):
        the first load compresses the checkpoint once into the cache ($RABBITLLM_CACHE), later
        loads stream from there. A split written by `rabbit split --compression` (`layers_path=`)
        streams compressed without the option.
        `torch_dtype` is accepted as an alias of `dtype`, like transformers does.

        `layers_path` points at a split directory (`rabbit split`); weights are then read from
        there while config and generation settings come from `source`. `allow_pickle=True` lets a
        `*.bin`/`*.pt`-only checkpoint be converted once to safetensors (with
        `torch.load(weights_only=True)`). `verify=True` checks the sha256 of every file of a split
        (`rabbit-split.json`) before loading; the sizes and headers of a split's files are checked
        always.
        """
        if "hf_token" in kwargs:
            warnings.warn(
                "hf_token= is deprecated; pass token= instead.", FutureWarning, stacklevel=2
            )
            token = token or kwargs.pop("hf_token")
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", dtype)
        options = StreamingOptions.from_kwargs(kwargs, base=options)
        if kwargs:
            raise InvalidOptionError(
                "AutoModel.from_pretrained got unknown option(s): "
                f"{', '.join(sorted(kwargs))}; the streaming options are "
                f"{', '.join(StreamingOptions.names())}.",
                option=sorted(kwargs)[0],
            )
        src = open_source(
            source,
            revision=revision,
            token=token,
            storage_options=storage_options,
            local_cache=local_cache,
        )
        config = load_config(
            src,
            trust_remote_code=trust_remote_code,
            refuse=refuse_unsupported,
            translate=translate_config,  # qwen, chatglm, baichuan, internlm(2) without their code
        )
        adapter = adapter_for(config)  # refuses an unsupported family before any weight is read
        weights_src = src
        if layers_path is not None:
            weights_src = open_source(
                layers_path, token=token, storage_options=storage_options, local_cache=local_cache
            )
        weights_src, index = _index(
            weights_src, allow_pickle=allow_pickle, revision=revision, verify=verify
        )
        if layers_path is not None:
            _check_split_of(src, index)
        weights_src, index = compressed_source(
            weights_src, index, options.compression, dtype=options.dtype, config=config
        )
        return load_streaming_model(
            weights_src, config=config, adapter=adapter, index=index, options=options
        )


def _check_split_of(source, index: CheckpointIndex) -> None:
    """A compressed split (`layers_path`) must be of the checkpoint at `source`, when `source` has
    weights to compare with: the same architecture with other weights would load without a
    shape error and give wrong numbers."""
    manifest = index.manifest
    if manifest is None or manifest.compression is None:
        return
    try:
        own = CheckpointIndex.load(source)
    except CheckpointNotFoundError:
        return  # a config-only source: nothing to compare
    if own.fingerprint != manifest.source_fingerprint:
        raise WeightMismatchError(
            f"{index.source.location}/{MANIFEST_FILE}: this compressed split was written from "
            f"{manifest.source}, not from the checkpoint at {source.location} (their fingerprints "
            "differ); compress this checkpoint (rabbit split --compression) or pass its own split."
        )
    differing = differing_copies(own, index)
    if differing:
        raise WeightMismatchError(
            f"{index.source.location}/{MANIFEST_FILE}: this compressed split has the layout of the "
            f"checkpoint at {source.location} but other weights ({', '.join(differing[:3])} "
            "differ byte for byte): it is a split of another checkpoint of this architecture; "
            "compress this checkpoint or pass its own split."
        )


def _index(source, *, allow_pickle: bool, revision: str | None, verify: bool = False):
    """The checkpoint index; a pickle-only checkpoint is refused or, if allowed, converted once."""
    try:
        return source, CheckpointIndex.load(source, verify_checksums=verify)
    except CheckpointNotFoundError:
        pickles = pickle_files(source)
        if not pickles:
            raise
    if not allow_pickle:
        raise PickleRefusedError(
            f"{source.location} holds only pickle weights ({', '.join(pickles[:3])}); "
            "loading pickle can run code, so it is refused. Convert it to safetensors "
            "(transformers: AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)), "
            "or pass allow_pickle=True (--allow-pickle) to convert it once with "
            "torch.load(weights_only=True)."
        )
    key = hashlib.sha256(f"{source.location}@{revision}".encode()).hexdigest()[:16]
    converted = open_source(convert_pickle_checkpoint(source, cache_root() / "converted" / key))
    return converted, CheckpointIndex.load(converted)
