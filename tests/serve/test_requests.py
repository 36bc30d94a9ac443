"""`rabbitllm.openai_requests` (shared by `rabbit serve` and `rabbit batch`) and the streaming
detokenizer, without a server: every refusal names its field, defaults fit the context, and the
streamed pieces add up to exactly the whole text."""

from __future__ import annotations

import pytest

from rabbitllm.openai_requests import (
    OpenAIRequestError,
    check_model,
    cut_at_stop,
    final_text,
    prepare,
)
from rabbitllm.serve.detokenize import IncrementalText, held_back
from tests.serve.conftest import CONTEXT

LIMIT = 4096


@pytest.fixture(scope="module")
def generation_config(tiny_model_dir):
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(tiny_model_dir)


@pytest.fixture
def prep(tokenizer, generation_config):
    def run(body, kind="completion", **kwargs):
        kwargs.setdefault("max_context", CONTEXT)
        kwargs.setdefault("max_tokens_limit", LIMIT)
        return prepare(body, kind, tokenizer, generation_config, **kwargs)

    return run


def test_prompt_forms_give_the_same_ids(prep, tokenizer):
    ids = tokenizer("The capital of France is").input_ids
    forms = ["The capital of France is", ["The capital of France is"], ids, [ids]]
    for form in forms:
        assert prep({"prompt": form}).prompt_ids == ids, form


def test_chat_goes_through_the_template(prep, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
        },
    ]
    got = prep({"messages": messages}, "chat")
    plain = [messages[0], {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert got.prompt_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert got.kind == "chat" and got.n == 1 and not got.stream


def test_request_fields_reach_the_sampling_params(prep):
    got = prep(
        {
            "model": "m",
            "prompt": "x",
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.8,
            "seed": 3,
            "stop": ["a", "bc", "a"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u1",
            "some_future_field": {"ignored": True},  # unknown fields are ignored, as OpenAI does
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logprobs": None,
        }
    )
    p = got.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed) == (7, 0.5, 0.8, 3)
    assert p.stop_strings == ("a", "bc")
    assert got.stream and got.include_usage and got.model == "m" and got.user == "u1"


def test_max_completion_tokens_and_top_p_zero(prep):
    got = prep(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 5,
            "max_tokens": 9,
            "top_p": 0,
            "temperature": 1.5,
        },
        "chat",
    )
    assert got.params.max_new_tokens == 5
    assert got.params.temperature == 0  # keeping no probability mass = the likeliest token


def test_default_max_tokens_fits_the_context(prep, tokenizer):
    ids = [5] * (CONTEXT - 3)
    assert prep({"prompt": ids}).params.max_new_tokens == 3
    assert prep({"prompt": "x"}, max_tokens_limit=2).params.max_new_tokens <= 2


@pytest.mark.parametrize(
    ("body", "kind", "param", "words"),
    [
        ({"prompt": "x", "n": 2}, "completion", "n", "only 1 is supported"),
        ({"prompt": "x", "n": "2"}, "completion", "n", "expected an integer"),
        ({"prompt": "x", "temperature": "hot"}, "completion", "temperature", "expected a number"),
        ({"prompt": "x", "temperature": 3}, "completion", "temperature", "between 0 and 2"),
        ({"prompt": "x", "top_p": 1.5}, "completion", "top_p", "between"),
        ({"prompt": "x", "max_tokens": 0}, "completion", "max_tokens", "at least 1"),
        ({"prompt": "x", "max_tokens": True}, "completion", "max_tokens", "expected an integer"),
        ({"prompt": "x", "max_tokens": LIMIT + 1}, "completion", "max_tokens", "limit"),
        ({"prompt": "x", "max_tokens": CONTEXT}, "completion", "max_tokens", "context"),
        ({"prompt": [7] * CONTEXT}, "completion", "prompt", "context"),
        ({"prompt": "x", "seed": 1.5}, "completion", "seed", "expected an integer"),
        ({"prompt": "x", "stop": 3}, "completion", "stop", "string"),
        ({"prompt": "x", "stop": ["a", ""]}, "completion", "stop", "empty"),
        ({"prompt": "x", "stop": list("abcde")}, "completion", "stop", "at most 4"),
        ({"prompt": "x", "stream": "yes"}, "completion", "stream", "boolean"),
        ({"prompt": "x", "stream_options": {}}, "completion", "stream_options", "stream"),
        ({"prompt": "x", "presence_penalty": 0.5}, "completion", "presence_penalty", "only 0"),
        ({"prompt": "x", "frequency_penalty": 1}, "completion", "frequency_penalty", "only 0"),
        ({"prompt": "x", "logprobs": 2}, "completion", "logprobs", "not supported"),
        ({"prompt": "x", "echo": True}, "completion", "echo", "not supported"),
        ({"prompt": "x", "model": 3}, "completion", "model", "string"),
        ({"prompt": "x", "user": ["u"]}, "completion", "user", "string"),
        ({}, "completion", "prompt", "required"),
        ({"prompt": ""}, "completion", "prompt", "empty"),
        ({"prompt": ["a", "b"]}, "completion", "prompt", "one prompt"),
        ({"prompt": [1, 10**9]}, "completion", "prompt", "vocabulary"),
        ({"prompt": {"text": "x"}}, "completion", "prompt", "expected"),
        ({}, "chat", "messages", "required"),
        ({"messages": []}, "chat", "messages", "empty"),
        ({"messages": "hi"}, "chat", "messages", "array"),
        ({"messages": [{"content": "hi"}]}, "chat", "messages[0].role", "string"),
        ({"messages": [{"role": "user", "content": 5}]}, "chat", "messages[0].content", "string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "chat",
            "messages[0].content",
            "not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "chat",
            "tools",
            "not supported",
        ),
    ],
)
def test_refusals_name_the_field(prep, body, kind, param, words):
    with pytest.raises(OpenAIRequestError) as info:
        prep(body, kind)
    err = info.value
    assert err.param == param
    assert words in err.message and err.message.startswith(param.split("[")[0])
    assert err.status == 400
    assert err.body()["error"]["param"] == param


def test_unknown_model_is_404():
    check_model(None, ["a"])
    check_model("a", ["a"])
    with pytest.raises(OpenAIRequestError) as info:
        check_model("b", ["a"])
    assert info.value.status == 404 and info.value.param == "model"
    assert info.value.body()["error"]["code"] == "model_not_found"


def test_final_text_cuts_before_the_first_stop(tokenizer):
    ids = tokenizer("one two. three\nfour").input_ids
    assert final_text(tokenizer, ids, ()) == "one two. three\nfour"
    assert final_text(tokenizer, ids, ["\n", "two"]) == "one "
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_held_back():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("abcab", ["abc", "bca"]) == 2
    assert held_back("x", []) == 0


TRICKY = "Grüße, 世界! 🙂🐇 naïve café\nnext line — done"


@pytest.mark.parametrize("stops", [(), ("\n",), ("🐇",), ("café\nne",), ("never there",)])
def test_streamed_pieces_add_up_to_the_whole_text(tokenizer, stops):
    ids = tokenizer(TRICKY, add_special_tokens=False).input_ids
    assert len(ids) > len(TRICKY) // 3  # byte-level pieces: several characters split over tokens
    text = IncrementalText(tokenizer, stops)
    pieces = [text.add([token]) for token in ids]
    pieces.append(text.finish())
    joined = "".join(pieces)
    assert joined == final_text(tokenizer, ids, stops)
    assert all("\ufffd" not in p for p in pieces)
    for stop in stops:  # no piece ever showed any part of a stop string that then matched
        if stop in TRICKY:
            assert stop not in joined
            assert text.stopped


def test_stream_holds_back_a_possible_stop_until_it_resolves(tokenizer):
    text = IncrementalText(tokenizer, ["END"])
    shown = text.add(tokenizer("value E", add_special_tokens=False).input_ids)
    assert shown == "value "  # "E" could start "END" ... or not
    shown += text.add(tokenizer("X", add_special_tokens=False).input_ids)
    assert shown == "value EX"


def test_eos_ids_come_from_the_config_and_the_tokenizer(tokenizer):
    from transformers import GenerationConfig

    from rabbitllm.openai_requests import eos_token_ids

    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=[7, 9])) == {
        7,
        9,
        tokenizer.eos_token_id,
    }
    assert eos_token_ids(tokenizer, None) == {tokenizer.eos_token_id}
