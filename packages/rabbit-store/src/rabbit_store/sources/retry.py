"""Backend failures: which are worth a retry (with backoff), and which RabbitError each becomes.

Why together: a retry loop ends in the same mapping as a call that is not retried (the last
transient error is reported like any other), and every backend (fsspec sources, split
destinations) needs both. Client libraries (botocore, aiohttp, httpx, requests) are never
imported here: their exception types are looked up only when that client is already loaded,
which it is whenever it raised.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from ..errors import AccessDeniedError, CheckpointNotFoundError, RabbitError, StorageError

logger = logging.getLogger(__name__)

#: errno values of a full destination: no space, quota exceeded, file-size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: Attempts of one remote read before giving up; only transient errors are retried.
READ_ATTEMPTS = 5
#: Backoff before retry k (1-based): RETRY_BASE_DELAY * 2**(k-1), capped at RETRY_MAX_DELAY, times a
#: random factor in [0.5, 1.5) so that many readers do not retry in lockstep.
RETRY_BASE_DELAY = 0.25
RETRY_MAX_DELAY = 8.0
#: errno values a backend uses for a failure worth retrying (s3fs: 503 SlowDown -> EBUSY, 500 ->
#: EREMOTEIO; sockets: resets, timeouts).
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        errno.EREMOTEIO,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EAGAIN,
    }
)
#: Connection-level exception types of the HTTP clients fsspec backends use, looked up only when
#: that client is already imported (it raised the error, so it is).
_CLIENT_ERRORS = (
    ("aiohttp", ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError")),
    ("httpx", ("TransportError",)),
    ("requests", ("ConnectionError", "Timeout")),
    (
        "botocore.exceptions",
        ("HTTPClientError", "ConnectionError", "ReadTimeoutError", "ResponseStreamingError"),
    ),
)
_CREDENTIAL_ERRORS = ("botocore.exceptions", ("NoCredentialsError", "PartialCredentialsError"))

T = TypeVar("T")


def _loaded_types(module_name: str, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The named exception classes of `module_name` if it is imported already, else ()."""
    module = sys.modules.get(module_name)
    return tuple(k for k in (getattr(module, n, None) for n in names) if isinstance(k, type))


def _missing_credentials(exc: BaseException) -> bool:
    """botocore's NoCredentialsError / PartialCredentialsError (not OSErrors)."""
    kinds = _loaded_types(*_CREDENTIAL_ERRORS)
    return bool(kinds) and isinstance(exc, kinds)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn backend exceptions (fsspec maps most to OSError subclasses) into RabbitErrors."""
    try:
        yield
    except RabbitError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{what}: not found ({exc}); check the location.") from exc
    except PermissionError as exc:
        raise AccessDeniedError(
            f"{what}: access denied ({exc}); check the credentials (storage_options / --token)."
        ) from exc
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise StorageError(
                f"{what}: no space left on the device ({os.strerror(exc.errno)}); free some space "
                "there or choose another destination."
            ) from exc
        raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if _missing_credentials(exc):
            raise AccessDeniedError(
                f"{what}: no credentials found ({exc}); pass "
                "storage_options={'key': ..., 'secret': ...} (--storage-option key=... "
                "--storage-option secret=...), set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or use anon=True for a public bucket."
            ) from exc
        raise


def _status_code(exc: BaseException) -> int | None:
    for value in (
        getattr(exc, "status", None),
        getattr(exc, "status_code", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if isinstance(value, int):
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can cure: connection resets, timeouts, HTTP 5xx and 429."""
    if isinstance(exc, RabbitError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    status = _status_code(exc)
    if status is not None:
        return status >= 500 or status == 429
    for module_name, names in _CLIENT_ERRORS:
        kinds = _loaded_types(module_name, names)
        if kinds and isinstance(exc, kinds):
            return True
    return False


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1-based): exponential, capped, jittered."""
    return min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def with_retries(what: str, call: Callable[[], T]) -> T:
    """`call()`, retried with exponential backoff and jitter while it fails transiently.

    Each retry logs a warning. Other errors are not retried; errors, and the last transient one,
    come out as RabbitErrors naming `what` (see storage_errors).
    """
    with storage_errors(what):
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == READ_ATTEMPTS:
                    raise StorageError(
                        f"{what}: {type(exc).__name__}: {exc} (still failing after {READ_ATTEMPTS} "
                        "attempts); check the network and the storage service, then retry."
                    ) from exc
                delay = backoff_delay(attempt)
                logger.warning(
                    "%s: %s: %s; retrying in %.3f s (attempt %d of %d)",
                    what,
                    type(exc).__name__,
                    exc,
                    delay,
                    attempt + 1,
                    READ_ATTEMPTS,
                )
                time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
