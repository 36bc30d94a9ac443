"""Every error the server returns, in OpenAI's shape: `{"error": {message, type, param, code}}`.

Existing clients (the `openai` package, LangChain, curl scripts) read that body; FastAPI's own
`{"detail": ...}` bodies would reach them as opaque failures, so its handlers are replaced too.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rabbit_engine.errors import InvalidOptionError, QueueFullError, SchedulerClosedError
from rabbitllm.openai_requests import OpenAIRequestError
from rabbitllm.serve.settings import RETRY_AFTER_SECONDS

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error response the route code decides on (auth, size, overload, shutdown)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def sse_error(status: int, message: str, code: str | None = None) -> str:
    """An error inside an already started event stream (the `openai` client raises it)."""
    return f"data: {json.dumps(error_body(status, message, None, code))}\n\n"


def from_exception(exc: BaseException) -> APIError:
    """The response for an exception raised while preparing or submitting a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, OpenAIRequestError):
        return APIError(exc.status, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"the server is busy ({exc}); retry in {RETRY_AFTER_SECONDS} s",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, SchedulerClosedError):
        return APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(exc, InvalidOptionError):  # the engine's own check, should prepare miss one
        param = str(exc).split(":", 1)[0] if ":" in str(exc) else None
        return APIError(400, str(exc), param=param, code="invalid_value")
    logger.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def install_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}", where, "invalid")

    for kind in (
        APIError,
        OpenAIRequestError,
        QueueFullError,
        SchedulerClosedError,
        InvalidOptionError,
    ):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_api_error)
