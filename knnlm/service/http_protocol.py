"""uvicorn's HTTP/1.1 protocol, telling the app when uvicorn answered a request itself.

A body that breaks HTTP's framing mid-request (a chunk size that is not hex, say) is
answered ``400 Bad Request`` by uvicorn, while the app only sees its client disconnect.
This protocol marks the request's scope first (``SERVER_ANSWERED``), so that the metrics and
the access log count the 400 the client got, not a client close. ``knnlm serve`` runs it;
under another server the app counts such a request as a client close (499).
"""

from __future__ import annotations

from typing import Any

SERVER_ANSWERED = "knnlm.server_answered"  # scope key: the status uvicorn itself sent


def protocol_class() -> type[Any]:
    """The protocol class that uvicorn's ``http="auto"`` would take (httptools where it is
    installed, h11 otherwise), marking the scope of a request it answers 400 itself."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class MarkingProtocol(Base):  # type: ignore[valid-type, misc]
        def send_400_response(self, msg: str) -> None:
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_started:
                cycle.scope[SERVER_ANSWERED] = 400
            super().send_400_response(msg)

    return MarkingProtocol
