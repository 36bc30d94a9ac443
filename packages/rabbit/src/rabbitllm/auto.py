"""`AutoModel.from_pretrained`: the one entry point, mirroring transformers' conventions."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from typing import Any

import torch
from transformers import PreTrainedModel

from rabbit_engine import load_config, load_streaming_model
from rabbit_engine.errors import InvalidOptionError, PickleRefusedError
from rabbit_engine.loader import DEFAULT_PREFETCH
from rabbit_engine.pickle_import import convert_pickle_checkpoint, pickle_files
from rabbit_models import adapter_for
from rabbit_store import CheckpointIndex, open_source
from rabbit_store.errors import CheckpointNotFoundError
from rabbitllm.default_model import cache_root

logger = logging.getLogger(__name__)


class AutoModel:
    """Not instantiated: `from_pretrained` returns transformers' own model class with streaming attached."""

    def __init__(self) -> None:
        raise TypeError("Use AutoModel.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        token: str | bool | None = None,
        hf_token: str | None = None,
        revision: str | None = None,
        storage_options: dict[str, Any] | None = None,
        attn_implementation: str | None = "auto",
        layers_path: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        max_memory: int | str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        profile: bool = False,
        local_cache: bool | str = False,
        allow_pickle: bool = False,
        verify: bool = False,
        bit_exact: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load `source` (local dir, hub id, or fsspec URL) for layer streaming.

        `layers_path` points at a split directory (`rabbit split`); weights are then read from there
        while config and generation settings come from `source`. `torch_dtype` is accepted as an
        alias of `dtype`, like transformers does. `allow_pickle=True` lets a `*.bin`/`*.pt`-only
        checkpoint be converted once to safetensors (with `torch.load(weights_only=True)`).
        `verify=True` checks the sha256 of every file of a split (`rabbit-split.json`) before loading;
        the sizes and headers of a split's files are checked always. `bit_exact=True` copies
        weights whose bytes are not 64-byte aligned in the file into aligned memory: float32 logits
        then equal transformers' bit for bit, at the cost of one copy per streamed layer (by
        default such weights are used in place, and some CPU kernels then round differently: a few
        float32 ulps on the logits, the same tokens).
        """
        if hf_token is not None:
            warnings.warn(
                "hf_token= is deprecated; pass token= instead.", FutureWarning, stacklevel=2
            )
            token = token or hf_token
        if "torch_dtype" in kwargs:
            dtype = dtype or kwargs.pop("torch_dtype")
        if kwargs:
            raise InvalidOptionError(
                f"AutoModel.from_pretrained got unknown option(s): {', '.join(sorted(kwargs))}."
            )
        src = open_source(
            source,
            revision=revision,
            token=token,
            storage_options=storage_options,
            local_cache=local_cache,
        )
        config = load_config(src, trust_remote_code=trust_remote_code)
        weights_src = src
        if layers_path is not None:
            weights_src = open_source(
                layers_path, token=token, storage_options=storage_options, local_cache=local_cache
            )
        weights_src, index = _index(
            weights_src, allow_pickle=allow_pickle, revision=revision, verify=verify
        )
        return load_streaming_model(
            weights_src,
            config=config,
            adapter=adapter_for(config),
            index=index,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            max_memory=max_memory,
            prefetch=prefetch,
            profile=profile,
            bit_exact=bit_exact,
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
            f"{source.location} holds only pickle weights ({', '.join(pickles[:3])}); loading pickle can run "
            "code, so it is refused. Convert it to safetensors (transformers: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)), or pass allow_pickle=True "
            "(--allow-pickle) to convert it once with torch.load(weights_only=True)."
        )
    key = hashlib.sha256(f"{source.location}@{revision}".encode()).hexdigest()[:16]
    converted = open_source(convert_pickle_checkpoint(source, cache_root() / "converted" / key))
    return converted, CheckpointIndex.load(converted)
