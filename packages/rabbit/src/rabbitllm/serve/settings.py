"""What an operator decides about one server: limits, the API key, the name it serves under."""

from __future__ import annotations

from dataclasses import dataclass, field

#: One request's body: a long chat history is tens of KB; megabytes are a mistake or an attack.
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 64
#: Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
#: Retry-After (seconds) sent with a 429: about one short request's time on a busy server.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = field(default=None, repr=False)
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    prompt_lookup: int = 0
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
