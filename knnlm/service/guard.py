"""The first thing every request meets: the API key, then the body, read whole and bounded.

A pure ASGI middleware (no route runs before it): a 401 without the right key (except on
the health probes and the page at ``/``), a 415 for a compressed body, a 413 for a body past
the limit, a 408 (and the
connection closed) for a body that takes longer than ``body_timeout`` seconds to arrive,
stalled or trickling, so a slow client cannot hold a connection, or a shutdown, forever;
otherwise the route sees the body replayed from memory, and a streaming response still
hears the client leave.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from knnlm.service.errors import error_response

# the probes, and the page (it holds nothing secret; its API calls send the key)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_SHUTDOWN_POLL = 0.1  # seconds between looks at the shutdown's deadline, reading a body


class Guard:
    """Before any route runs: the API key (a 401 otherwise), then the body, read whole up
    to ``max_body_bytes`` (a 413 past it) within ``body_timeout`` seconds of the request's
    headers (a 408 past it; None: no limit), so no handler sees an oversized body.

    ``shutdown_deadline()`` gives the time (``time.monotonic``) at which a shutdown stops
    waiting for bodies (``math.inf`` while none runs): a body still coming then gets a 503
    and the connection closes, rather than holding the exit until the server cancels it.
    """

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout: float | None = None,
        shutdown_deadline: Callable[[], float] = lambda: math.inf,
    ) -> None:
        if body_timeout is not None and not 0 < body_timeout < math.inf:
            raise ValueError("body_timeout must be positive and finite, or None")
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.shutdown_deadline = shutdown_deadline

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
        encoding = headers.get("content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):  # never parsed as if it were plain JSON
            shown = encoding.decode("latin-1")[:40]
            message = f"Content-Encoding {shown!r} is not accepted: send the body uncompressed"
            await error_response(415, message)(scope, receive, send)
            return
        declared = headers.get("content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        body = b""
        deadline = time.monotonic() + (self.body_timeout or math.inf)
        while True:
            message = await self._receive_by(receive, deadline)
            if message is None:
                await self._too_slow(scope, receive, send)
                return
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

        await self._until_gone(scope, replay, receive, send)

    async def _until_gone(
        self, scope: Scope, replay: Receive, receive: Receive, send: Send
    ) -> None:
        """Run the route; if the client disconnects before its response has ended, cancel
        it, so that the model's job it waits for is cancelled too (``result_or_cancel``,
        a stream's cleanup) and no more work is done for nobody. Once the body is read,
        the only message left to receive is the disconnect."""
        ended = False

        async def watched_send(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        route = asyncio.ensure_future(self.app(scope, replay, watched_send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({route, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not route.done() and not ended:  # the client left first
                route.cancel()
            await asyncio.wait({route})  # unlike ``await route``, keeps its errors for below
        finally:
            gone.cancel()
            route.cancel()  # nothing once it is done; else the server cancelled us: it too
        if not route.cancelled():
            route.result()  # the route's own error, raised for the server to log

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

    async def _receive_by(self, receive: Receive, deadline: float) -> Message | None:
        """The next message, or None once ``deadline`` (time.monotonic) or the shutdown's
        passes. Looks at the shutdown's every ``_SHUTDOWN_POLL`` seconds, since it may
        begin while this waits."""
        coming = asyncio.ensure_future(receive())
        try:
            while not coming.done():
                now = time.monotonic()
                left = min(deadline, self.shutdown_deadline()) - now
                if left <= 0:
                    return None
                await asyncio.wait({coming}, timeout=min(left, _SHUTDOWN_POLL))
            return coming.result()
        finally:
            coming.cancel()

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, message = 503, "the server is shutting down; send the request again later"
        if time.monotonic() < self.shutdown_deadline():
            status = 408
            message = (
                f"the body did not arrive within {self.body_timeout:g} s (--body-timeout); "
                "send it at once, or ask the operator for a longer timeout"
            )
        await error_response(status, message, {"connection": "close"})(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the body is larger than this server takes ({self.max_body_bytes:,} bytes)"
        await error_response(413, message, {"connection": "close"})(scope, receive, send)


async def _disconnect(receive: Receive) -> None:
    """Returns when ``receive`` says the client disconnected (the body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass
