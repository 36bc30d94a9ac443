"""`rabbit serve` through the official `openai` client and raw HTTP, against one real process.

Greedy text is checked against transformers' own `generate` on the same prompt ids (the oracle);
streamed text against the whole response; each error case by status, OpenAI's error body and the
field it names, followed by a request that must still succeed.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.conftest import CONTEXT, MODEL_NAME, oracle_ids

PROMPT = "The quick brown fox jumps over the lazy dog. Then it"
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def still_serves(server) -> None:
    r = httpx.post(
        server.base_url + "/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_health_and_models(server):
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert server.client().models.retrieve(MODEL_NAME).id == MODEL_NAME


@pytest.mark.parametrize("max_tokens", [1, 24])
def test_completion_equals_transformers_greedy(server, reference, tokenizer, max_tokens):
    ids = tokenizer(PROMPT).input_ids
    got = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=0
    )
    expected = oracle_ids(reference, ids, max_tokens)
    choice = got.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == max_tokens
    assert got.usage.total_tokens == len(ids) + max_tokens
    assert got.model == MODEL_NAME and got.object == "text_completion"
    assert got.id.startswith("cmpl-")


def test_chat_equals_transformers_greedy(server, reference, tokenizer):
    got = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0
    )
    ids = chat_ids(tokenizer, MESSAGES)
    expected = oracle_ids(reference, ids, 20)
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 20
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")


def _streamed(stream) -> tuple[str, str | None, object, int]:
    """Joined text, finish reason, the usage chunk's usage, and the number of chunks."""
    text, finish, usage, count = [], None, None, 0
    for chunk in stream:
        count += 1
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        piece = choice.delta.content if hasattr(choice, "delta") else choice.text
        text.append(piece or "")
        if choice.finish_reason is not None:
            assert finish is None, "two chunks with a finish_reason"
            finish = choice.finish_reason
    return "".join(text), finish, usage, count


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_equals_whole(server, kind):
    client = server.client()
    common = {"model": MODEL_NAME, "max_tokens": 30, "temperature": 0}
    if kind == "chat":
        whole = client.chat.completions.create(messages=MESSAGES, **common)
        stream = client.chat.completions.create(
            messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **common
        )
        expected = whole.choices[0].message.content
    else:
        whole = client.completions.create(prompt=PROMPT, **common)
        stream = client.completions.create(
            prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **common
        )
        expected = whole.choices[0].text
    text, finish, usage, count = _streamed(stream)
    assert text == expected
    assert finish == whole.choices[0].finish_reason == "length"
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()
    assert count > 5  # it did stream, token by token


def test_stream_without_usage_and_done_marker(server):
    with httpx.stream(
        "POST",
        server.base_url + "/completions",
        json={"prompt": PROMPT, "max_tokens": 5, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings(server, tokenizer):
    client = server.client()
    free = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=30)
    full = free.choices[0].text
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]  # a word in the middle: the answer must end just before it
    cut = full.index(stop)
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=30, stop=[stop])
    assert got.choices[0].text == full[:cut]
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 30
    text, finish, _, _ = _streamed(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=30, stop=stop, stream=True
        )
    )
    assert (text, finish) == (full[:cut], "stop")


def test_seed_makes_sampling_reproducible(server):
    client = server.client()

    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.5, seed=seed
        )
        return r.choices[0].text

    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3)}) > 1  # the seed matters


def _post(server, path: str, content: bytes | str, **kwargs) -> httpx.Response:
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60)


ERROR_CASES = [
    # (path, body, status, param, words)
    ("/completions", "{not json", 400, None, "not valid JSON"),
    ("/completions", "[1, 2]", 400, None, "JSON object"),
    ("/completions", '{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens", "integer"),
    ("/completions", '{"prompt": "x", "temperature": [1]}', 400, "temperature", "number"),
    ("/completions", '{"prompt": "x", "n": 2}', 400, "n", "only 1 is supported"),
    ("/completions", '{"model": "gpt-4", "prompt": "x"}', 404, "model", "gpt-4"),
    ("/completions", json.dumps({"prompt": [5] * (CONTEXT + 10)}), 400, "prompt", "context"),
    (
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "w " * CONTEXT}]}),
        400,
        "messages",
        "context",
    ),
    (
        "/completions",
        json.dumps({"prompt": "x", "max_tokens": CONTEXT}),
        400,
        "max_tokens",
        "context",
    ),
    ("/completions", '{"prompt": "x", "max_tokens": 100000}', 400, "max_tokens", "limit"),
    ("/chat/completions", '{"messages": [{"role": 1}]}', 400, "messages[0].role", "string"),
    ("/chat/completions", '{"prompt": "x"}', 400, "messages", "required"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), ERROR_CASES)
def test_errors_use_openai_shape_and_the_server_keeps_serving(
    server, path, body, status, param, words
):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"]
    still_serves(server)


def test_unknown_route_and_method_use_openai_shape(server):
    for r in (
        httpx.get(server.base_url + "/nothing", timeout=10),
        httpx.get(server.base_url + "/completions", timeout=10),
    ):
        assert r.status_code in (404, 405)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as info:  # the client raises its typed error
        server.client().completions.create(model=MODEL_NAME, prompt="x", n=2)
    assert getattr(info.value, "status_code", None) == 400
    still_serves(server)


def test_prompt_lookup_keeps_the_greedy_text(make_server, reference, tokenizer):
    """Drafts proposed from the context are verified in the pass: the text is the oracle's."""
    server = make_server("--prompt-lookup", "4")
    prompt = "one two three four one two three four one two three"
    got = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24)
    expected = oracle_ids(reference, tokenizer(prompt).input_ids, 24)
    assert got.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert got.usage.completion_tokens == 24


def test_a_draft_model_keeps_the_greedy_text_in_fewer_passes(
    make_server, reference, tokenizer, tiny_model_dir
):
    """--draft-model: the model itself as its own draft, so every proposal is right; the text is
    the oracle's and the server's pass counter shows several tokens per pass."""
    server = make_server("--draft-model", str(tiny_model_dir))
    prompt = "The quick brown fox"
    got = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24)
    expected = oracle_ids(reference, tokenizer(prompt).input_ids, 24)
    assert got.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    stats = httpx.get(f"{server.url}/health").json()
    assert stats["generated_tokens"] == got.usage.completion_tokens == len(expected)
    assert stats["passes"] <= len(expected) // 2
