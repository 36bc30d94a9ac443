"""The endpoints: `/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The bodies are read and parsed here rather than by FastAPI's pydantic models: `prepare` is the one
validator (shared with `rabbit batch`), malformed JSON must give OpenAI's error body rather than
FastAPI's, and the size limit must hold while the body is still arriving (a chunked upload has no
Content-Length to refuse up front).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rabbit_engine.batching.requests import RequestHandle, TokenEvent
from rabbitllm.openai_requests import Kind, PreparedRequest, check_model, final_text, prepare
from rabbitllm.serve.detokenize import IncrementalText
from rabbitllm.serve.engine import POLL_SECONDS, Engine
from rabbitllm.serve.errors import APIError, from_exception, sse_error
from rabbitllm.serve.protocol import DONE, Reply, sse, usage
from rabbitllm.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _settings(request: Request) -> ServeSettings:
    return request.app.state.settings


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = _engine(request)
    status = "shutting_down" if engine.closing else "ok"
    body = {"status": status, "model": engine.name, **engine.scheduler.stats}
    return JSONResponse(body, 503 if engine.closing else 200)


def _model_card(request: Request) -> dict[str, Any]:
    return {
        "id": _engine(request).name,
        "object": "model",
        "created": request.app.state.started,
        "owned_by": "rabbitllm",
    }


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    check_model(model_id, [_engine(request).name])
    return _model_card(request)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> JSONResponse | StreamingResponse:
    return await _serve(request, "completion")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
    return await _serve(request, "chat")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes (checked as it arrives), 400 when malformed."""
    too_large = APIError(
        413, f"the request body is over this server's limit of {limit} bytes", code="too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


async def _serve(request: Request, kind: Kind) -> JSONResponse | StreamingResponse:
    engine, settings = _engine(request), _settings(request)
    body = await read_json(request, settings.max_request_bytes)
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_type")
    if engine.closing:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(body.get("model"), str):
        check_model(body["model"], [engine.name])
    prepared = await engine.tokenize(
        functools.partial(
            prepare,
            body,
            kind,
            engine.tokenizer,
            engine.generation_config,
            max_context=engine.max_context,
            max_tokens_limit=settings.max_tokens_limit,
            prompt_lookup=settings.prompt_lookup,
        )
    )
    reply = Reply(kind, engine.name)
    handle = engine.scheduler.submit(prepared.prompt_ids, prepared.params, request_id=reply.id)
    if prepared.stream:
        return StreamingResponse(
            _stream(request, engine, handle, prepared, reply),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(await _whole(request, engine, handle, prepared, reply))


def _failure(event: TokenEvent) -> APIError | None:
    """The error response for a request that ended without an answer."""
    if event.finish_reason == "error":
        error = event.error
        detail = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        return APIError(500, f"generation failed: {detail}", code="generation_failed")
    if event.finish_reason == "cancelled":
        return APIError(
            503, "the request was cancelled: the server is shutting down", code="shutting_down"
        )
    return None


async def _events(
    request: Request, engine: Engine, handle: RequestHandle
) -> AsyncIterator[TokenEvent]:
    """The request's events until the last; stops (the caller cancels) if the client leaves."""
    checked = time.monotonic()
    while True:
        event = await engine.next_event(handle)
        now = time.monotonic()
        if event is None or now - checked > POLL_SECONDS:
            checked = now
            if await request.is_disconnected():
                logger.info("client of %s went away; cancelling it", handle.request_id)
                return
        if event is None:
            continue
        yield event
        if event.finish_reason is not None:
            return


async def _whole(
    request: Request, engine: Engine, handle: RequestHandle, prepared: PreparedRequest, reply: Reply
) -> dict[str, Any]:
    last = None
    try:
        async for event in _events(request, engine, handle):
            last = event
    finally:
        if last is None or last.finish_reason is None:
            handle.cancel()  # the client left, or this task was cancelled (shutdown)
    if last is None or last.finish_reason is None:
        raise APIError(499, "the client closed the connection", code="client_closed")
    failure = _failure(last)
    if failure is not None:
        raise failure
    text = final_text(engine.tokenizer, handle.output_ids, prepared.params.stop_strings)
    return reply.whole(
        text, last.finish_reason, usage(len(prepared.prompt_ids), len(handle.output_ids))
    )


async def _stream(
    request: Request, engine: Engine, handle: RequestHandle, prepared: PreparedRequest, reply: Reply
) -> AsyncIterator[str]:
    """Server-sent events: text as it becomes final, the finish reason, usage if asked, [DONE]."""
    text = IncrementalText(engine.tokenizer, prepared.params.stop_strings)
    with_usage = prepared.include_usage
    finished = False

    def chunk(piece: str | None, finish: str | None = None, *, first: bool = False) -> str:
        return sse(reply.chunk(piece, finish, first=first, with_usage_field=with_usage))

    try:
        if reply.kind == "chat":
            yield chunk("", first=True)
        async for event in _events(request, engine, handle):
            failure = _failure(event)
            if failure is not None:
                finished = True
                yield sse_error(failure.status, failure.message, failure.code)
                yield DONE
                return
            piece = text.add(event.token_ids)
            finish = event.finish_reason
            if finish is None and text.stopped:  # a stop string the scheduler has not seen yet
                handle.cancel()
                finish = "stop"
            if finish is None:
                if piece:
                    yield chunk(piece)
                continue
            finished = True
            piece += text.finish()
            if reply.kind == "chat":
                if piece:
                    yield chunk(piece)
                yield chunk(None, finish)
            else:
                yield chunk(piece, finish)
            if with_usage:
                completion = len(text.ids)
                yield sse(reply.usage_chunk(usage(len(prepared.prompt_ids), completion)))
            yield DONE
            return
    except Exception as exc:  # an error after the headers went out: tell the client in-band
        err = from_exception(exc)
        yield sse_error(err.status, err.message, err.code)
    finally:
        if not finished:
            handle.cancel()
