"""The first thing every request meets: the API key, then the body, read whole and bounded.

A pure ASGI middleware (no route runs before it): a 401 without the right key (except on
the health probes), a 413 for a body past the limit; otherwise the route sees the body
replayed from memory, and a streaming response still hears the client leave.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from knnlm.service.errors import error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes work without the API key
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Guard:
    """Before any route runs: the API key (a 401 otherwise), then the body, read whole up
    to ``max_body_bytes`` (a 413 past it), so no handler sees an oversized body."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            refusal = self._refusal(headers.get("authorization"))
            if refusal is not None:
                bearer = {"www-authenticate": "Bearer"}
                await error_response(401, refusal, bearer)(scope, receive, send)
                return
        declared = headers.get("content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, for streaming responses
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _refusal(self, authorization: bytes | None) -> str | None:
        """Why the request may not pass, or None."""
        assert self.key is not None
        if authorization is None:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return "the Authorization header must be 'Bearer <key>'"
        if not hmac.compare_digest(given.strip(), self.key):
            return "wrong API key"
        return None

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the body is larger than this server takes ({self.max_body_bytes:,} bytes)"
        await error_response(413, message, {"connection": "close"})(scope, receive, send)
