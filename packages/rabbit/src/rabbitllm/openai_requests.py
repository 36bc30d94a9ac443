"""OpenAI request bodies (completions and chat) turned into prompt ids and sampling settings.

Shared by `rabbit serve` and `rabbit batch`, so both accept the same fields and refuse the same
mistakes with the same message. Every refusal names the field at fault (`param`), as OpenAI's own
API does, so a client sees which of its fields to fix. Fields OpenAI defines but we cannot honour
(n > 1, logprobs, tools, non-zero presence/frequency penalties) are refused unless they carry their
neutral value, rather than silently ignored: a client asking for them would otherwise get an answer
that is quietly not what it asked for. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from rabbit_engine.batching.requests import SamplingParams
from rabbit_engine.errors import InvalidOptionError
from rabbitllm import generation_defaults
from rabbitllm.generation_defaults import resolve

Kind = Literal["chat", "completion"]

#: OpenAI allows at most this many stop sequences.
MAX_STOP_STRINGS = 4


class OpenAIRequestError(ValueError):
    """A request body the server refuses; `param` names the field, `status` the HTTP status."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        *,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        error_type = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {
            "error": {
                "message": self.message,
                "type": error_type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: what the scheduler needs, plus what the response echoes."""

    prompt_ids: list[int]
    params: SamplingParams
    kind: Kind
    model: str | None
    stream: bool
    n: int
    include_usage: bool = False  # stream_options.include_usage
    user: str | None = None


# ---- field readers -------------------------------------------------------------------------------


def _type_error(name: str, expected: str, value: Any) -> OpenAIRequestError:
    return OpenAIRequestError(
        f"{name}: expected {expected}, got {type(value).__name__} {_short(value)}",
        name,
        "invalid_type",
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(body: dict[str, Any], name: str, *, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON clients may send 16.0
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    if minimum is not None and value < minimum:
        raise OpenAIRequestError(
            f"{name}: must be at least {minimum}, got {value}", name, "invalid_value"
        )
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _type_error(name, "a number", value)
    if not low <= value <= high:
        raise OpenAIRequestError(
            f"{name}: must be between {low:g} and {high:g}, got {value}", name, "invalid_value"
        )
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _unsupported(name: str, what: str) -> OpenAIRequestError:
    return OpenAIRequestError(f"{name}: {what}", name, "unsupported_value")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Known OpenAI fields we cannot honour: fine at their neutral value, refused otherwise."""
    n = _int(body, "n", minimum=1)
    if n is not None and n != 1:
        raise _unsupported("n", "only 1 is supported")
    best_of = _int(body, "best_of", minimum=1)
    if best_of is not None and best_of != 1:
        raise _unsupported("best_of", "only 1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name, -2.0, 2.0)
        if value:
            raise _unsupported(
                name, "only 0 is supported (use repetition_penalty, a multiplicative penalty)"
            )
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0):
        if not isinstance(logprobs, bool | int):
            raise _type_error("logprobs", "a boolean or an integer", logprobs)
        raise _unsupported("logprobs", "log probabilities are not supported")
    if body.get("top_logprobs") not in (None, 0):
        raise _unsupported("top_logprobs", "log probabilities are not supported")
    if _bool(body, "echo"):
        raise _unsupported("echo", "echoing the prompt is not supported")
    if _str(body, "suffix"):
        raise _unsupported("suffix", "suffix (fill-in-the-middle) is not supported")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise _type_error("logit_bias", "an object", bias)
        if bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
    for name in ("tools", "functions"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, list):
                raise _type_error(name, "an array", value)
            if value:
                raise _unsupported(name, "tool calls are not supported")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise _type_error("response_format", "an object", fmt)
        if fmt.get("type", "text") != "text":
            raise _unsupported("response_format", 'only {"type": "text"} is supported')


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP_STRINGS:
        raise OpenAIRequestError(
            f"stop: at most {MAX_STOP_STRINGS} stop sequences, got {len(items)}",
            "stop",
            "invalid_value",
        )
    if any(s == "" for s in items):
        raise OpenAIRequestError("stop: stop sequences must not be empty", "stop", "invalid_value")
    return tuple(dict.fromkeys(items))


# ---- prompts -------------------------------------------------------------------------------------


def _check_ids(ids: list[Any], tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    for token in ids:
        if not _is_int(token):
            raise _type_error("prompt", "token ids (integers)", token)
        if not 0 <= token < vocab:
            raise OpenAIRequestError(
                f"prompt: token id {token} is outside the vocabulary (0..{vocab - 1})",
                "prompt",
                "invalid_value",
            )
    return list(ids)


def _completion_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise OpenAIRequestError("prompt: is required", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        # an empty string is refused as such: whether it tokenizes to nothing or to a lone BOS
        # depends on the tokenizer and the transformers version
        ids = list(tokenizer(prompt).input_ids) if prompt else []
    elif isinstance(prompt, list):
        if prompt and all(isinstance(p, str | list) for p in prompt):
            raise _unsupported("prompt", "only one prompt per request is supported")
        ids = _check_ids(prompt, tokenizer)
    else:
        raise _type_error("prompt", "a string, an array of one string or an array of ids", prompt)
    if not ids:
        raise OpenAIRequestError("prompt: is empty", "prompt", "invalid_value")
    return ids


def _message_text(content: Any, index: int) -> str | None:
    """A message's content as text: a string, or the text parts of a content array."""
    name = f"messages[{index}].content"
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type_error(name, "a string or an array of content parts", content)
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _type_error(name, "content parts with a type", part)
        if part["type"] != "text":
            raise _unsupported(name, f"content parts of type {part['type']!r} are not supported")
        if not isinstance(part.get("text"), str):
            raise _type_error(name + ".text", "a string", part.get("text"))
        texts.append(part["text"])
    return "".join(texts)


def _chat_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise OpenAIRequestError("messages: is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array of messages", messages)
    if not messages:
        raise OpenAIRequestError("messages: must not be empty", "messages", "invalid_value")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _type_error(f"messages[{i}].role", "a string", role)
        text = _message_text(message.get("content"), i)
        conversation.append({"role": role, "content": text if text is not None else ""})
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIRequestError(
            "messages: this model's tokenizer has no chat template; use /v1/completions",
            "messages",
            "no_chat_template",
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja raises TemplateError for roles the template refuses
        raise OpenAIRequestError(
            f"messages: the chat template refused them: {exc}", "messages", "invalid_value"
        ) from exc
    # the template writes the special tokens (BOS included) itself
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# ---- the whole request ---------------------------------------------------------------------------


def eos_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer (for the
    scheduler's `eos_token_ids`)."""
    return generation_defaults.eos_token_ids(generation_config, tokenizer)


def prepare(
    body: dict[str, Any],
    kind: Kind,
    tokenizer: Any,
    generation_config: Any,
    *,
    max_context: int | None,
    max_tokens_limit: int,
    prompt_lookup: int = 0,
) -> PreparedRequest:
    """Validate `body` and turn it into prompt ids and sampling settings.

    Sampling fields the request leaves out come from the model's generation config through
    `generation_defaults.resolve`. An explicit max_tokens over `max_tokens_limit` or past the end of
    the context is refused; a default one is shortened to fit, as OpenAI does. `prompt_lookup` is
    the operator's setting (`--prompt-lookup`), not a request field.
    """
    if not isinstance(body, dict):
        raise _type_error("body", "a JSON object", body)
    model = _str(body, "model")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        if not stream:
            raise OpenAIRequestError(
                "stream_options: only allowed when stream is true",
                "stream_options",
                "invalid_value",
            )
        include_usage = bool(_bool(options, "include_usage"))
    user = _str(body, "user")
    _refuse_unsupported(body)

    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens_field = next((n for n in names if body.get(n) is not None), names[-1])
    max_tokens = _int(body, max_tokens_field, minimum=1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise OpenAIRequestError(
            f"{max_tokens_field}: {max_tokens} is over this server's limit of {max_tokens_limit}",
            max_tokens_field,
            "invalid_value",
        )
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        # keeping no probability mass means keeping only the most likely token: greedy
        temperature, top_p = 0.0, None
    top_k = _int(body, "top_k", minimum=-1)  # vLLM's extension; -1 and 0 mean off
    top_k = None if top_k is None else max(top_k, 0)
    repetition_penalty = _number(body, "repetition_penalty", 1e-6, 10.0)
    seed = _int(body, "seed")
    stop = _stop_strings(body)

    prompt_ids = _chat_ids(body, tokenizer) if kind == "chat" else _completion_ids(body, tokenizer)
    prompt_field = "messages" if kind == "chat" else "prompt"
    room = None
    if max_context is not None:
        room = max_context - len(prompt_ids)
        if room < 1:
            raise OpenAIRequestError(
                f"{prompt_field}: the prompt is {len(prompt_ids)} tokens, which leaves no room "
                f"in the model's context of {max_context} tokens",
                prompt_field,
                "context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise OpenAIRequestError(
                f"{max_tokens_field}: the prompt is {len(prompt_ids)} tokens and {max_tokens} "
                f"more would pass the model's context of {max_context} tokens (at most {room})",
                max_tokens_field,
                "context_length_exceeded",
            )

    try:
        params = resolve(
            generation_config,
            eos_token_ids=eos_token_ids(tokenizer, generation_config),
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_strings=stop,
            prompt_lookup=prompt_lookup,
        )
    except InvalidOptionError as exc:  # a range the checks above do not know (should not happen)
        field = str(exc).split("=", 1)[0].strip()
        field = max_tokens_field if field == "max_new_tokens" else field
        raise OpenAIRequestError(f"{field}: {exc}", field, "invalid_value") from exc
    if max_tokens is None:
        fitted = min(params.max_new_tokens, max_tokens_limit, room or max_tokens_limit)
        if fitted != params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=fitted)
    return PreparedRequest(
        prompt_ids=prompt_ids,
        params=params,
        kind=kind,
        model=model,
        stream=stream,
        n=1,
        include_usage=include_usage,
        user=user,
    )


def check_model(requested: str | None, served: Iterable[str]) -> None:
    """404 for a model name the server does not serve (an absent name means the one served)."""
    served = list(served)
    if requested is not None and requested not in served:
        raise OpenAIRequestError(
            f"model: {requested!r} is not served here; this server serves {', '.join(served)}",
            "model",
            "model_not_found",
            status=404,
        )


def cut_at_stop(text: str, stop_strings: Iterable[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def final_text(tokenizer: Any, ids: list[int], stop_strings: Iterable[str]) -> str:
    """The generated ids as text, without special tokens, cut before the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return cut_at_stop(text, stop_strings)[0]
