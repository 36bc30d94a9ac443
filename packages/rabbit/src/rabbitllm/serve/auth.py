"""`--api-key`: every request but the health probe carries `Authorization: Bearer KEY`.

A plain ASGI middleware rather than a route dependency, so a request without the key is refused
before its body is read or parsed (an unauthenticated client cannot make the server parse megabytes
of JSON). The comparison is constant-time (`hmac.compare_digest`), so response timing does not tell
an attacker how many leading characters were right; the key is never logged, and refusals do not
echo what was sent.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from rabbitllm.serve.errors import error_response

#: Paths a load balancer probes without credentials.
OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        if not given:
            message = "missing API key: send the header 'Authorization: Bearer YOUR_KEY'"
        elif scheme.lower() != b"bearer":
            message = "the Authorization header must be 'Bearer YOUR_KEY'"
        elif hmac.compare_digest(token.strip(), self._key):
            await self.app(scope, receive, send)
            return
        else:
            message = "incorrect API key"
        response = error_response(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)
