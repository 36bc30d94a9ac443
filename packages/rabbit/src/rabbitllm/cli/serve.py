"""`rabbit serve`: an OpenAI-compatible HTTP server (completions and chat, streamed or not).

Every request that arrives while others run joins them at the next step, so one streamed pass
through the layers computes a token for every client. Point any OpenAI client at it:

    rabbit serve --port 8000
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

Defaults, and why: it binds to 127.0.0.1 (pass --host 0.0.0.0 to serve the network, and then set
--api-key or RABBIT_API_KEY: every request must carry `Authorization: Bearer KEY`); the model is
the bundled SmolLM2, like `generate`. Sampling defaults come from the model's generation_config.json
and each request's own fields override them. SIGTERM or Ctrl-C stops it gracefully: in-flight
requests get --shutdown-timeout seconds to finish, the rest are cancelled.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
from typing import Any

from rabbitllm.cli.console import Console
from rabbitllm.cli.errors import FeatureNotAvailableError, UsageError
from rabbitllm.cli.generation import add_speculative_options, scheduler_draft
from rabbitllm.cli.loading import load_model, load_tokenizer, open_model
from rabbitllm.cli.options import (
    add_runtime_options,
    add_source_options,
    model_spec,
    positive_int,
    runtime_options,
)

API_KEY_ENV = "RABBIT_API_KEY"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    from rabbitllm.serve.settings import (
        DEFAULT_MAX_BATCH,
        DEFAULT_MAX_QUEUE,
        DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_TOKENS_LIMIT,
        DEFAULT_SHUTDOWN_TIMEOUT,
    )

    p = subparsers.add_parser(
        "serve",
        parents=[common],
        help="OpenAI-compatible HTTP server with continuous batching",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV}, "
        "else none); never printed",
    )
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model id clients pass (default: the --model value, or the default model's name)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"requests computed together in one pass (default: {DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help=f"requests waiting for a batch slot before new ones get 429 "
        f"(default: {DEFAULT_MAX_QUEUE})",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        metavar="N",
        help=f"the most max_tokens a request may ask for (default: {DEFAULT_MAX_TOKENS_LIMIT})",
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help=f"largest request body; bigger ones get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})",
    )
    add_speculative_options(p)  # verified in the shared pass, for greedy requests
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metavar="S",
        help=f"seconds in-flight requests get to finish on SIGTERM "
        f"(default: {DEFAULT_SHUTDOWN_TIMEOUT:g})",
    )
    add_source_options(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise FeatureNotAvailableError(
            f"rabbit serve needs {' and '.join(missing)}, which this installation lacks: "
            'pip install "rabbitllm[serve]"'
        )


def run(args: argparse.Namespace, console: Console) -> int:
    require_serve_extra()
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be between 0 and 65535")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key:
        console.add_secrets([api_key])
    runtime = runtime_options(args)
    from rabbitllm.serve import listen

    sock = listen(args.host, args.port)  # a taken port fails now, not after a long model load
    try:
        return _serve(args, console, runtime, api_key, sock)
    finally:
        sock.close()


def _serve(
    args: argparse.Namespace,
    console: Console,
    runtime: Any,
    api_key: str | None,
    sock: socket.socket,
) -> int:
    from rabbitllm.default_model import MODEL_NAME
    from rabbitllm.serve import Engine, ServeSettings, run_server

    spec = model_spec(args, progress=not console.quiet)
    name = args.served_model_name or (MODEL_NAME if spec.is_default else args.model)
    settings = ServeSettings(
        model_name=name,
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        prompt_lookup=args.prompt_lookup or 0,
        shutdown_timeout=args.shutdown_timeout,
    )
    source = open_model(spec, trust_remote_code=runtime.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=runtime.trust_remote_code)
    model = load_model(spec, runtime)
    try:
        engine = Engine.start(
            model,
            tokenizer,
            name,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            draft=scheduler_draft(args, model, tokenizer, spec, runtime),
        )
    except BaseException:
        model.close()
        raise

    def ready(url: str) -> None:
        auth = " (API key required)" if api_key else ""
        console.note(f"Serving {name} at {url}/v1{auth}; stop with Ctrl-C or SIGTERM")

    try:
        run_server(engine, settings, sock, on_ready=ready)
    finally:
        engine.close()  # also when uvicorn failed before its lifespan ran
    console.note("Server stopped")
    return 0
