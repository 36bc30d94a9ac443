"""One line of a batch input file as a request: an OpenAI completion or chat body, or an OpenAI
Batch API line wrapping one; or, when it cannot be one, the error row naming its line and field.

Shared by `rabbit batch` and `rabbitllm.ray`, so both read the same lines the same way (the body's
own fields are then checked by `openai_requests.prepare`, as the server checks them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
from dataclasses import dataclass
from typing import Any

#: OpenAI Batch API urls and the request kind each one means.
BATCH_API_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


@dataclass(frozen=True)
class LineError:
    """Why one input line cannot run; becomes that line's error row."""

    line: int
    message: str
    param: str | None = None

    def row(self, request_id: str) -> dict[str, Any]:
        return {
            "id": request_id,
            "error": {"message": self.message, "line": self.line, "param": self.param},
        }


@dataclass(frozen=True)
class InputLine:
    """One request of IN: its 1-based line number, id, and body (None when `error` is set)."""

    number: int
    id: str
    body: dict[str, Any] | None = None
    kind: str | None = None
    error: LineError | None = None


def parse_line(number: int, text: bytes) -> InputLine:
    """One line of IN: a completion or chat body, or an OpenAI Batch API line wrapping one."""
    default_id = f"line-{number}"

    def failed(message: str, param: str | None, request_id: str = default_id) -> InputLine:
        return InputLine(
            number, request_id, error=LineError(number, f"line {number}: {message}", param)
        )

    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return failed(f"not valid JSON: {exc}", None)
    if not isinstance(data, dict):
        return failed(f"expected a JSON object, got {type(data).__name__}", None)
    id_field = "custom_id" if "custom_id" in data else "id"
    request_id = data.get(id_field, default_id)
    if not isinstance(request_id, str) or not request_id:
        return failed(f"{id_field}: expected a non-empty string, got {request_id!r}", id_field)
    if "custom_id" in data or "body" in data:
        return _batch_api_line(number, request_id, data, failed)
    if "messages" in data and "prompt" in data:
        message = "has both prompt (a completion) and messages (a chat); give one"
        return failed(message, "messages", request_id)
    if "messages" in data:
        return InputLine(number, request_id, body=data, kind="chat")
    if "prompt" in data:
        return InputLine(number, request_id, body=data, kind="completion")
    message = "missing field prompt (a completion) or messages (a chat)"
    return failed(message, "prompt", request_id)


def _batch_api_line(number: int, request_id: str, data: dict[str, Any], failed: Any) -> InputLine:
    """{"custom_id", "method", "url", "body"}: the file format of OpenAI's Batch API."""
    body = data.get("body")
    if not isinstance(body, dict):
        return failed(
            f"body: expected a JSON object, got {type(body).__name__}", "body", request_id
        )
    url = data.get("url")
    if url is None:
        kind = "chat" if "messages" in body else "completion"
    elif url in BATCH_API_URLS:
        kind = BATCH_API_URLS[url]
    else:
        choices = " or ".join(BATCH_API_URLS)
        return failed(f"url: {url!r} is not supported; use {choices}", "url", request_id)
    return InputLine(number, request_id, body=body, kind=kind)


# ---- a line's body -> prompt ids and sampling settings -------------------------------------------


@dataclass(frozen=True)
class SamplingDefaults:
    """What the lines leave out, for callers without command-line flags (rabbitllm.ray): None
    means the model's generation config decides, as for an unset flag of `rabbit batch`."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    prompt_lookup: int = 0
    stop_on_repetition: bool = True


@dataclass
class Job:
    line: InputLine
    prompt_ids: list[int]
    params: Any  # rabbit_engine.batching.requests.SamplingParams
    handle: Any = None  # its RequestHandle, once submitted


def command_config(generation_config: Any, args: Any) -> Any:
    """The model's generation config with the command's sampling defaults (`rabbit batch`'s flags,
    or a `SamplingDefaults`) written over it.

    So a flag is a default for every line: below the line's own fields, above the model's config.
    A max_tokens that comes from here (not from the line) is shortened to fit the context, as
    OpenAI does for its default, instead of failing the lines with long prompts.
    """
    config = (
        copy.deepcopy(generation_config)
        if generation_config is not None
        else types.SimpleNamespace()
    )
    if args.max_new_tokens is not None:
        config.max_new_tokens = args.max_new_tokens
    if args.temperature is not None:
        config.do_sample = args.temperature > 0
        if args.temperature > 0:
            config.temperature = args.temperature
    for name in ("top_p", "top_k", "repetition_penalty"):
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    return config


class Sampler:
    """Turns a line's body into prompt ids and sampling settings: the server's own checks
    (rabbitllm.openai_requests), with the command's flags as the defaults of what a line leaves
    out (`command_config`)."""

    def __init__(
        self,
        args: Any,  # rabbit batch's parsed flags, or a SamplingDefaults
        tokenizer: Any,
        generation_config: Any,
        max_context: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = command_config(generation_config, args)
        self.seed = args.seed
        self.prompt_lookup = args.prompt_lookup or 0
        self.stop_on_repetition = args.stop_on_repetition
        self.max_context = max_context

    def job(self, line: InputLine) -> Job | LineError:
        from rabbitllm.openai_requests import OpenAIRequestError, prepare

        if line.body is None or line.kind is None:
            raise ValueError(f"line {line.number} has no request to prepare")
        body = line.body
        if self.seed is not None and body.get("seed") is None:
            body = {**body, "seed": self.seed}
        try:
            prepared = prepare(
                body,
                line.kind,  # type: ignore[arg-type]
                self.tokenizer,
                self.config,
                max_context=self.max_context,
                max_tokens_limit=self.max_context or sys.maxsize,
                prompt_lookup=self.prompt_lookup,
            )
        except OpenAIRequestError as exc:
            return LineError(line.number, f"line {line.number}: {exc.message}", exc.param)
        params = prepared.params
        if params.stop_on_repetition != self.stop_on_repetition:
            params = dataclasses.replace(params, stop_on_repetition=self.stop_on_repetition)
        return Job(line, prepared.prompt_ids, params)
