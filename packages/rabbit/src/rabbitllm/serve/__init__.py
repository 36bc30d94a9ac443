"""`rabbit serve`: an OpenAI-compatible HTTP server over one streamed model.

Why FastAPI + uvicorn with our own scheduler rather than `transformers serve` and its
ContinuousBatchingManager: the manager crashes on transformers 5.0 on CPU (its memory handler
assumes CUDA) and takes one generation config for every request (no per-request temperature, seed
or stop), and `transformers serve` loads models itself. The scheduler
(`rabbit_engine.batching.scheduler`) runs every active request in each streamed pass; this package
is the HTTP side: request validation (`rabbitllm.openai_requests`), OpenAI's response shapes,
server-sent events, auth, limits and shutdown.

Modules: `app` (the app and uvicorn lifecycle), `routes` (endpoints, streaming), `engine` (model,
tokenizer, scheduler, and the async bridge to its events), `detokenize` (text that is final),
`protocol` (OpenAI's JSON), `errors` (OpenAI's error body), `auth` (the bearer key), `settings`.
The modules that import fastapi need the `serve` extra; this package's own import does not (the
CLI reads `settings` to build its --help on installs without the extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "rabbitllm.serve.engine",
    "ServeSettings": "rabbitllm.serve.settings",
    "create_app": "rabbitllm.serve.app",
    "listen": "rabbitllm.serve.app",
    "run_server": "rabbitllm.serve.app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
