"""The FastAPI app around one `Engine`, and running it under uvicorn until SIGTERM or Ctrl-C.

Shutdown, in order: uvicorn stops accepting connections; the engine stops taking requests and gives
the ones in flight `shutdown_timeout` seconds to finish, then cancels the rest (their clients get
an error event or a 503, not a cut connection); uvicorn waits for the responses to go out; the
app's lifespan frees the model. SIGTERM is the ordinary way to stop a service, so it ends with exit
status 0 and no traceback (uvicorn would re-raise the signal after its own shutdown, which kills
the process with status -15).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType

from fastapi import FastAPI

from rabbit_store.errors import RabbitError
from rabbitllm.serve.auth import BearerAuth
from rabbitllm.serve.engine import Engine
from rabbitllm.serve.errors import install_handlers
from rabbitllm.serve.routes import router
from rabbitllm.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


class ListenError(RabbitError):
    """The server cannot listen on the address it was given (port taken, no such interface)."""


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error, not uvicorn's
    log line and exit status 3."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(f"--host {host}: cannot listen there: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (--port 0 picks a free port)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(
        title="RabbitLLM",
        description="OpenAI-compatible completions and chat over a layer-streamed model",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.started = int(time.time())
    install_handlers(app)
    app.include_router(router)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    return app


def run_server(
    engine: Engine,
    settings: ServeSettings,
    sock: socket.socket,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve on `sock` (from `listen`) until SIGTERM/SIGINT; returns after a graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # handled here: do not die by it after the shutdown
                self._captured_signals = [s for s in self._captured_signals if s != sig]
            if first:
                logger.info("shutting down: finishing in-flight requests")
                threading.Thread(
                    target=engine.drain,
                    args=(settings.shutdown_timeout,),
                    name="rabbit-serve-drain",
                    daemon=True,
                ).start()

        async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                bound = sock.getsockname()
                name = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
                on_ready(f"http://{name}:{bound[1]}")

    config = uvicorn.Config(
        create_app(engine, settings),
        log_config=None,  # our handlers (with the CLI's redaction) rather than uvicorn's own
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 15,
        lifespan="on",
    )
    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
