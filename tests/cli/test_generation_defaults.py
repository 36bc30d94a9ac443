"""Sampling defaults: a flag or request field, else the model's generation_config, else ours
(greedy, with the loop stop); and the default chat answers simple questions sensibly."""

from __future__ import annotations

import re

import pytest
from transformers import GenerationConfig

from rabbit_engine.errors import InvalidOptionError
from rabbitllm.generation_defaults import (
    REPETITION_PENALTY,
    SAMPLING_TEMPERATURE,
    SAMPLING_TOP_K,
    SAMPLING_TOP_P,
    eos_token_ids,
    generate_kwargs,
    resolve,
)
from tests.cli.conftest import finish, run_rabbit, start_rabbit
from tests.cli.test_speculative import SPEED, save_tiny_llama

EOS = {2}


def test_a_model_that_sets_nothing_gets_greedy_with_the_loop_stop():
    for config in (None, GenerationConfig(bos_token_id=1, eos_token_id=2, max_length=20)):
        params = resolve(config, eos_token_ids=EOS)
        assert params.greedy and params.stop_on_repetition
        assert params.max_new_tokens == 256, "max_length counts the prompt: never a default"
        assert params.stop_token_ids == frozenset(EOS)
        assert resolve(config, eos_token_ids=EOS, fallback_max_new_tokens=512).max_new_tokens == 512


def test_the_models_generation_config_fills_what_the_request_leaves_out():
    sampled = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1,
        max_new_tokens=77,
    )  # fmt: skip
    params = resolve(sampled, eos_token_ids=EOS)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)
    assert (params.repetition_penalty, params.max_new_tokens) == (1.1, 77)
    # do_sample without a temperature: transformers samples at its own defaults
    bare = resolve(GenerationConfig(do_sample=True), eos_token_ids=EOS)
    assert (bare.temperature, bare.top_p, bare.top_k) == (1.0, 1.0, 50)
    # do_sample false means greedy, whatever temperature the file also carries
    greedy = GenerationConfig(do_sample=False, temperature=0.6)
    assert resolve(greedy, eos_token_ids=EOS).greedy


def test_request_fields_override_the_model():
    sampled = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=77
    )
    params = resolve(
        sampled,
        eos_token_ids=EOS,
        temperature=0.0,
        max_new_tokens=5,
        top_p=0.5,
        top_k=0,
        repetition_penalty=1.3,
        seed=7,
        stop_strings=["\n\n"],
        prompt_lookup=4,
        stop_on_repetition=False,
    )
    assert params.greedy and params.max_new_tokens == 5
    assert (params.top_p, params.top_k, params.repetition_penalty) == (0.5, 0, 1.3)
    assert (params.seed, params.stop_strings, params.prompt_lookup) == (7, ("\n\n",), 4)
    assert not params.stop_on_repetition
    # a temperature asks for sampling even when the model says greedy
    assert not resolve(GenerationConfig(do_sample=False), eos_token_ids=EOS, temperature=0.8).greedy


def test_out_of_range_values_name_the_field():
    with pytest.raises(InvalidOptionError, match="top_p"):
        resolve(None, eos_token_ids=EOS, top_p=1.5)
    with pytest.raises(InvalidOptionError, match="max_new_tokens"):
        resolve(None, eos_token_ids=EOS, max_new_tokens=0)


def test_our_sampling_fallbacks_are_transformers_own():
    defaults = GenerationConfig._get_default_generation_params()
    assert SAMPLING_TEMPERATURE == defaults["temperature"]
    assert SAMPLING_TOP_P == defaults["top_p"]
    assert SAMPLING_TOP_K == defaults["top_k"]
    assert REPETITION_PENALTY == defaults["repetition_penalty"]


def test_generate_kwargs_say_exactly_what_the_params_say():
    greedy = resolve(None, eos_token_ids=EOS, max_new_tokens=9)
    assert generate_kwargs(greedy) == {
        "max_new_tokens": 9,
        "do_sample": False,
        "repetition_penalty": 1.0,
    }
    sampled = resolve(None, eos_token_ids=EOS, temperature=0.7, top_p=0.9)
    assert generate_kwargs(sampled) == {
        "max_new_tokens": 256,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.0,
    }


def test_eos_ids_come_from_the_config_and_the_tokenizer():
    class Tok:
        eos_token_id = 5

    assert eos_token_ids(GenerationConfig(eos_token_id=[2, 3]), Tok()) == {2, 3, 5}
    assert eos_token_ids(None, None) == set()


# ---- through the CLI ---------------------------------------------------------------------------
def test_cli_takes_the_token_budget_from_the_model_unless_told(default_model_cache, tmp_path):
    """A model whose generation_config.json says max_new_tokens 5 writes 5 tokens; -n 7 wins."""
    tiny = save_tiny_llama(
        tmp_path / "tiny", generation_config={"max_new_tokens": 5, "do_sample": False}
    )
    env = default_model_cache.env
    args = ["generate", "The rabbit", "--model", str(tiny), "--no-chat"]
    runs = {
        "model": start_rabbit(args, env),
        "flag": start_rabbit([*args, "-n", "7"], env),
    }
    counts = {}
    for name, proc in runs.items():
        result = finish(proc)
        assert result.returncode == 0, result.stderr[-3000:]
        counts[name] = int(SPEED.search(result.stderr).group(1))
    assert counts == {"model": 5, "flag": 7}


@pytest.mark.slow
def test_default_chat_answers_simple_questions(default_model_cache):
    """`rabbit chat` as a new user runs it: no flags. The old default (temperature 0.7, top-p 0.9)
    answered the first question with looping French verse in one seed of three."""
    questions = {
        "What is the capital of France?": "Paris",
        "What is 2+2?": "4",
        "How many days are in a week?": "7",
    }
    stdin = "\n/reset\n".join(questions) + "\n"
    result = run_rabbit(["chat", "-q"], default_model_cache.env, stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) == len(questions), result.stdout
    for reply, expected in zip(replies, questions.values(), strict=True):
        assert expected in reply, replies


@pytest.mark.slow
def test_a_looping_reply_stops_early(default_model_cache):
    """Greedy, the default model's poem about Paris repeats its last line until the budget ends;
    the loop stop ends it about a hundred tokens into the loop and says so. (No streamed passes
    here, so the speed note has none either: SPEED does not apply.)"""
    # every layer resident (--max-memory auto): the same text, several times faster on CPU
    args = ["generate", "Write a poem about Paris.", "-n", "240", "--max-memory", "auto"]
    result = run_rabbit(args, default_model_cache.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "repeating itself" in result.stderr
    tokens = int(re.search(r"\[(\d+) tokens in", result.stderr).group(1))
    assert tokens < 200
    line = "A place where the beauty of the world is revealed,"
    assert 3 <= result.stdout.count(line) < 12
