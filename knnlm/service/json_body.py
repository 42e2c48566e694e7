"""A body that parses as JSON is JSON, whatever its declared content type.

``curl -d '{"text": ...}'`` declares ``application/x-www-form-urlencoded``, and FastAPI would
then not read the body as JSON at all. This middleware sits inside the guard (which has read
the body whole, within its limit) and, for such a body, declares it as JSON before any
route sees it. A body that is not JSON keeps its type and gets the usual 400.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _is_json_type(value: bytes) -> bool:
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class JsonBody:
    """Pure ASGI: re-declare a JSON body sent with another content type as JSON."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-type")
        if declared is not None and _is_json_type(declared):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:  # the guard replays the body as one message; read it all the same
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks)
        try:
            json.loads(body)
        except ValueError:  # not JSON (or not UTF-8): left as declared
            await self.app(scope, _replay(chunks, receive), send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        headers.append((b"content-type", b"application/json"))
        await self.app({**scope, "headers": headers}, _replay(chunks, receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that gives ``messages`` first, then what the client sends next (a
    disconnect, for streaming responses)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
