"""Reading a checkpoint's config.json into transformers' own config class, safely."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rabbit_engine.errors import UnsupportedModelError
from rabbit_engine.prequantized import check_prequantized
from rabbit_store.errors import InvalidCheckpointError, RabbitError

logger = logging.getLogger(__name__)


def load_config(
    source,
    *,
    trust_remote_code: bool = False,
    refuse: Callable[[str | None], None] | None = None,
    translate: Callable[[dict, str], PretrainedConfig | None] | None = None,
) -> PretrainedConfig:
    """config.json -> transformers config; remote code only when the caller asked for it.

    `refuse(model_type)` is called with the raw model_type before transformers parses anything:
    the facade passes rabbit_models' support check, so a refused family is refused for its real
    reason even when its config would not parse here (the engine cannot import rabbit_models).
    `translate(data, location)`, unless remote code was asked for, may turn the raw config of a
    family whose checkpoints ship their own code into the config of a transformers class that
    computes the same model (rabbit_models.remote), or return None to go on as usual."""
    if not source.exists("config.json"):
        raise InvalidCheckpointError(
            f"{source.location}: no config.json; point at a model directory (the one with "
            "config.json and *.safetensors)."
        )
    try:
        data = source.read_json("config.json")
    except (ValueError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(
            f"{source.location}/config.json is not valid JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidCheckpointError(f"{source.location}/config.json is not a JSON object.")
    model_type = data.get("model_type")
    if refuse is not None:
        refuse(model_type)
    if not model_type and not data.get("architectures"):
        raise InvalidCheckpointError(
            f"{source.location}/config.json names neither 'model_type' nor 'architectures'; "
            "it is not a transformers model config."
        )
    check_prequantized(source.location, data)
    if translate is not None and not trust_remote_code:
        translated = translate(data, source.location)
        if translated is not None:
            return translated
    if model_type in CONFIG_MAPPING and "auto_map" not in data:
        return CONFIG_MAPPING[model_type].from_dict(data)
    if not trust_remote_code and "auto_map" not in data:
        from rabbit_engine.skeleton import supported_model_types

        raise UnsupportedModelError(
            f"{source.location}/config.json: model_type={model_type!r} is not a model type this "
            f"transformers knows; supported model types: {', '.join(supported_model_types())}. "
            "Upgrade transformers if the family is newer; pass trust_remote_code=True only if the "
            "checkpoint ships its own code and you trust its authors."
        )
    if not trust_remote_code:
        raise UnsupportedModelError(
            f"{source.location}: model_type={model_type!r} is not built into transformers and "
            "needs the checkpoint's own Python code; pass trust_remote_code=True "
            "(--trust-remote-code) only if you trust its authors."
        )
    local = source.local_path("config.json")
    if local is None:
        raise RabbitError(
            "trust_remote_code=True needs a local or hub model (its code files must be importable)."
        )
    import os

    return AutoConfig.from_pretrained(os.path.dirname(local), trust_remote_code=True)
