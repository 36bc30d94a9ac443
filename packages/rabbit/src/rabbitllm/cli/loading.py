"""Loading what the text commands need: the tokenizer (from any source) and the streaming model.

The library works on token ids and never needs a tokenizer; the CLI does. For a local directory (or
a hub repo, whose files `local_path` brings into the hub cache) transformers reads the tokenizer in
place; for a remote store the few tokenizer files are copied into a temporary directory first.
The families whose checkpoints ship their tokenizer as code (QWen v1, ChatGLM, Baichuan, InternLM)
get a tokenizer built from their vocabulary file without that code (family_tokenizers).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from rabbit_store.split import AUX_PATTERNS
from rabbitllm.cli.errors import TokenizerNotFoundError
from rabbitllm.cli.family_tokenizers import (
    FamilyVocabulary,
    family_vocabulary,
    load_family_tokenizer,
    missing_vocabulary_error,
)
from rabbitllm.cli.options import ModelSpec, RuntimeOptions

logger = logging.getLogger(__name__)

#: Files a tokenizer may consist of: the same top-level files a split copies beside the layers
#: (tokenizer files, config.json for the model type, chat template), taken from the store.
TOKENIZER_PATTERNS = AUX_PATTERNS
#: At least one of these must exist for there to be a tokenizer at all.
VOCAB_PATTERNS = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.*",
    "*.tiktoken",
    "tokenizer_config.json",
)


def open_model(spec: ModelSpec, *, trust_remote_code: bool = False) -> Any:
    """The store Source of `spec`, checked to be a model: a missing location, a directory without
    a usable config.json or a family RabbitLLM refuses fails here, in a second, before the
    tokenizer is looked for, with the library's own message (a RabbitError)."""
    from rabbit_engine import load_config
    from rabbit_models.remote import translate_config
    from rabbit_models.support import refuse_unsupported
    from rabbit_store import open_source

    source = open_source(
        spec.location,
        revision=spec.revision,
        token=spec.token,
        storage_options=spec.storage_options,
    )
    load_config(
        source,
        trust_remote_code=trust_remote_code,
        refuse=refuse_unsupported,
        translate=translate_config,
    )
    return source


def tokenizer_files(source) -> list[str]:
    """Top-level files of `source` that belong to a tokenizer."""
    return sorted(
        name
        for name in source.list_files()
        if "/" not in name and any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS)
    )


def load_tokenizer(source: Any, *, trust_remote_code: bool = False) -> Any:
    """transformers' tokenizer of the model in `source`; TokenizerNotFoundError when it has none."""
    names = tokenizer_files(source)
    if not any(fnmatch.fnmatch(n, p) for n in names for p in VOCAB_PATTERNS):
        raise TokenizerNotFoundError(
            f"{source.location} has no tokenizer (no tokenizer.json, tokenizer.model or vocab "
            "files); text commands need one. Pass a model that ships its tokenizer, or use the "
            "library on token ids: AutoModel.from_pretrained(...).generate(input_ids=...)."
        )
    # the checkpoint's own tokenizer code is what --trust-remote-code asks for; otherwise a
    # remote-code family's tokenizer is built from its vocabulary file
    family = None if trust_remote_code else family_vocabulary(_model_type(source, names))
    local = [source.local_path(n) for n in names]
    if all(local) and len({os.path.dirname(p) for p in local}) == 1:
        return _from_dir(os.path.dirname(local[0]), source.location, trust_remote_code, family)
    with tempfile.TemporaryDirectory(prefix="rabbit-tokenizer-") as tmp:
        for name in names:
            Path(tmp, name).write_bytes(source.read_bytes(name))
        return _from_dir(tmp, source.location, trust_remote_code, family)


def _model_type(source: Any, names: list[str]) -> str | None:
    """config.json's model_type (open_model has already checked that the config is usable)."""
    if "config.json" not in names:
        return None
    try:
        data = json.loads(source.read_bytes("config.json"))
    except (OSError, ValueError):
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _from_dir(
    folder: str, location: str, trust_remote_code: bool, family: FamilyVocabulary | None = None
) -> Any:
    from transformers import AutoTokenizer

    from rabbit_store.errors import RabbitError

    if family is not None:
        if os.path.isfile(os.path.join(folder, family.vocab_file)):
            return load_family_tokenizer(folder, family, location)
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise missing_vocabulary_error(family, location)
        # a tokenizer.json that transformers may read (with a class of its own) comes next
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except RabbitError:
        raise
    except Exception as exc:  # transformers raises many types here; all mean "unusable"
        if family is None:
            raise _unusable(location, exc) from exc
        raise missing_vocabulary_error(family, location) from exc


def _unusable(location: str, exc: Exception) -> TokenizerNotFoundError:
    return TokenizerNotFoundError(
        f"the tokenizer of {location} could not be loaded: {type(exc).__name__}: {exc}"
    )


def load_model(spec: ModelSpec, runtime: RuntimeOptions) -> Any:
    """`rabbitllm.AutoModel.from_pretrained` with the CLI's options."""
    from rabbitllm import AutoModel

    logger.info("Loading %s", spec.location)
    return AutoModel.from_pretrained(
        spec.location,
        token=spec.token,
        revision=spec.revision,
        storage_options=spec.storage_options,
        layers_path=runtime.layers,
        trust_remote_code=runtime.trust_remote_code,
        options=runtime.streaming,
    )
