"""Sampling settings for one generation: the caller's, else the model's, else ours.

The CLI, the server and batch jobs all resolve settings here, so a value means the same everywhere.
Precedence follows transformers: a value the caller gives (a CLI flag, a request field) wins; else
the model's `generation_config.json` (`do_sample`, `temperature`, `top_p`, `top_k`,
`repetition_penalty`, `max_new_tokens`; `do_sample: false` there means greedy); else our fallback.
`max_length` in a generation config is ignored: it counts the prompt too, and many configs carry
transformers' old default of 20 that nobody chose.

Why the fallback is greedy: measured on the bundled SmolLM2-135M-Instruct with its chat template,
64 new tokens, seeds 0-2, questions "What is the capital of France?", "What is 2+2?", "How many
days are in a week?", "What colour is the sky on a clear day?", "Name a primary colour.", "What is
the capital of Spain?". Greedy answers Paris, 4, 7 days and blue (and "El Salvador" for Spain).
Temperature 0.2 (top-p 0.9) gave greedy's answers in all three seeds and nothing better; at 0.3
the sky turned indigo in one seed; at 0.5 one seed found Madrid, but one rambled past 64 tokens on
2+2 and two made the sky indigo; at 0.7 / top-p 0.9 / top-k 50 (the CLI's old chat default) one
seed in three each made France "Estéla", a week "7 into 13" and Spain "Estáditione de la
capital", and at 200 tokens seed 3 looped "estándú, estándú, ..." to the end. Sampling buys a
small model little but wrong answers, while greedy is reproducible and lets prompt lookup verify
exact drafts; its one weakness, loops, is what `stop_on_repetition` cuts
(rabbit_engine.batching.repetition). A request that wants variety passes a temperature, and then
transformers' own defaults fill what is unset (top-k 50, top-p 1.0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from rabbit_engine.batching.requests import SamplingParams

logger = logging.getLogger(__name__)

# Ours, when neither the caller nor the model says (see the module docstring for the measurement).
FALLBACK_TEMPERATURE = 0.0
# transformers' defaults for a sampled generation whose config leaves these unset
# (GenerationConfig._get_default_generation_params); a test keeps them in step.
SAMPLING_TEMPERATURE = 1.0
SAMPLING_TOP_P = 1.0
SAMPLING_TOP_K = 50
REPETITION_PENALTY = 1.0


def _model_value(generation_config: Any, name: str) -> Any:
    return None if generation_config is None else getattr(generation_config, name, None)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _temperature(generation_config: Any, requested: float | None) -> float:
    """The request's temperature; else the model's sampling choice; else ours."""
    if requested is not None:
        return float(requested)
    do_sample = _model_value(generation_config, "do_sample")
    if do_sample is False:
        return 0.0
    if do_sample is True:
        model_temperature = _model_value(generation_config, "temperature")
        return float(_first(model_temperature, SAMPLING_TEMPERATURE))
    return FALLBACK_TEMPERATURE


def resolve(
    generation_config: Any,
    *,
    eos_token_ids: Iterable[int],
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop_strings: Iterable[str] = (),
    prompt_lookup: int = 0,
    stop_on_repetition: bool = True,
    fallback_max_new_tokens: int = 256,
) -> SamplingParams:
    """One request's settings: each argument that is not None, else `generation_config`'s value
    (a transformers `GenerationConfig`, or None for a model without one), else the fallback.

    Raises rabbit_engine.errors.InvalidOptionError naming the field when a value is out of range.
    """
    temp = _temperature(generation_config, temperature)
    params = SamplingParams(
        max_new_tokens=int(
            _first(
                max_new_tokens,
                _model_value(generation_config, "max_new_tokens"),
                fallback_max_new_tokens,
            )
        ),
        temperature=temp,
        top_p=float(_first(top_p, _model_value(generation_config, "top_p"), SAMPLING_TOP_P)),
        top_k=int(_first(top_k, _model_value(generation_config, "top_k"), SAMPLING_TOP_K)),
        repetition_penalty=float(
            _first(
                repetition_penalty,
                _model_value(generation_config, "repetition_penalty"),
                REPETITION_PENALTY,
            )
        ),
        seed=seed,
        stop_token_ids=frozenset(int(i) for i in eos_token_ids),
        stop_strings=tuple(stop_strings),
        stop_on_repetition=stop_on_repetition,
        prompt_lookup=prompt_lookup,
    )
    logger.debug("resolved sampling settings: %s", params)
    return params


def eos_token_ids(generation_config: Any, tokenizer: Any = None) -> set[int]:
    """Every id that ends a generation: the generation config's `eos_token_id` (an int or a list)
    and the tokenizer's."""
    ids: set[int] = set()
    value = _model_value(generation_config, "eos_token_id")
    if isinstance(value, int):
        ids.add(value)
    elif value is not None:
        ids.update(int(v) for v in value)
    token = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if token is not None:
        ids.add(int(token))
    return ids


def generate_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Arguments for transformers' `model.generate` that say exactly what `params` says (they
    override the model's generation_config). Greedy passes only `do_sample=False`; the model's
    sampling values stay in its config, where transformers ignores them when not sampling."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,  # 1.0 too: it overrides the model's
    }
    if params.greedy:
        kwargs["do_sample"] = False
        return kwargs
    kwargs.update(
        do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k
    )
    return kwargs
