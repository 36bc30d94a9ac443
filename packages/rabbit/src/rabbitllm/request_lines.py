"""One line of a batch input file as a request: an OpenAI completion or chat body, or an OpenAI
Batch API line wrapping one; or, when it cannot be one, the error row naming its line and field.

Shared by `rabbit batch` and `rabbitllm.ray`, so both read the same lines the same way (the body's
own fields are then checked by `openai_requests.prepare`, as the server checks them).
"""

from __future__ import annotations

import json
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
