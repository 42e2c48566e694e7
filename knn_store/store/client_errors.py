"""What a failed call to Qdrant through qdrant-client means, over REST or gRPC alike: worth
retrying (the server never answered, or said it is busy), the key refused, the server's
certificate untrusted; and one line that says what happened."""

from __future__ import annotations

TRANSIENT_STATUS = (429, 502, 503, 504)  # HTTP answers that say: try again later


def untrusted_certificate(exc: BaseException) -> bool:
    """True when a TLS handshake failed on the server's certificate (REST or gRPC)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return True
    import grpc

    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "details", None)):
        details = str(exc.details() or "")
        return "certificate" in details.lower() or "handshake" in details.lower()
    return False


def access_denied(exc: BaseException) -> str | None:
    """'unauthenticated' when the server refused the key itself, 'forbidden' when the key
    lacks the right (a read-only or per-collection key), over REST or gRPC; else None."""
    import grpc
    from qdrant_client.http.exceptions import UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        return {401: "unauthenticated", 403: "forbidden"}.get(exc.status_code)
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return {
            grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
            grpc.StatusCode.PERMISSION_DENIED: "forbidden",
        }.get(exc.code())
    return None


def is_transient(exc: BaseException) -> bool:
    """True when the server never answered (refused, timed out) or said it is busy, over
    REST or gRPC: the same call may succeed later."""
    import grpc
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError)):
        return True
    if isinstance(exc, UnexpectedResponse):
        # a cluster whose replicas are away answers 500 "... currently unavailable"
        unavailable = exc.status_code == 500 and "unavailable" in str(exc).lower()
        return exc.status_code in TRANSIENT_STATUS or unavailable
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return False


def describe_error(exc: BaseException) -> str:
    """One line about an exception. gRPC errors print over several lines, with the part
    that matters (code and details) last, so they are read through their accessors."""
    import grpc

    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        return f"gRPC {exc.code().name}: {' '.join(str(details or '').split())}".strip()
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__
