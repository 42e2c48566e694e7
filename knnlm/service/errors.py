"""Errors as the API answers them: OpenAI's error body on every route, and no traceback ever
reaching a client.

Every refusal is ``{"error": {"message", "type", "param", "code"}}``, the body OpenAI's API
sends and its clients parse (``openai.BadRequestError`` and kin), so one shape serves the
OpenAI routes and knnlm's own (``/v1/score``, ``/v1/explain``, the guard's 401 and 413):

=======  ==========================  =====================================================
status   type                        when
=======  ==========================  =====================================================
400      ``invalid_request_error``   a body that fails validation (FastAPI's 422 included),
                                     a parameter this server refuses, a prompt too long
                                     for the model's context
401      ``authentication_error``    a missing or wrong API key
404      ``invalid_request_error``   no such route, or no such model (code
                                     ``model_not_found``)
405      ``invalid_request_error``   a route asked with the wrong method
408      ``invalid_request_error``   a body that did not arrive in time (--body-timeout)
413      ``invalid_request_error``   a body or text past the server's limits
429      ``rate_limit_error``        too many requests waiting (with ``Retry-After``)
500      ``server_error``            a bug: the server log has the traceback
503      ``service_unavailable``     the store or the model worker is not available, or
                                     the server is shutting down
504      ``server_error``            a request past its deadline (--request-timeout)
=======  ==========================  =====================================================

``param`` names the request field at fault (``"messages.0.content"``) where there is one,
and ``code`` is a short machine-readable reason (``unsupported_parameter``,
``unknown_parameter``, ``invalid_json``, ``model_not_found``, ``invalid_api_key``,
``context_length_exceeded``) or null.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from knn_store.errors import KnnlmError, ServiceUnavailable, StoreError
from knnlm.service.schemas import ErrorBody, ErrorDetail

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A refusal with its status, the field at fault and a machine-readable code.

    Handlers raise it; the app's handler answers it in OpenAI's shape.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON of an error, as a streamed event carries it too."""
    if status == 401 and code is None:
        code = "invalid_api_key"
    detail = ErrorDetail(
        message=one_line(message),
        type=ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
        param=param,
        code=code,
    )
    return ErrorBody(error=detail).model_dump()


def error_response(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status, headers)


def knnlm_error_status(error: KnnlmError) -> int:
    """The status of a library error: the server's trouble (503, or the status a batcher
    error carries, such as 429 for a full queue) or the request's (400)."""
    status = getattr(error, "status", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status
    if isinstance(error, (StoreError, ServiceUnavailable)):
        return 503
    return 400


def knnlm_error_response(error: KnnlmError) -> JSONResponse:
    status = knnlm_error_status(error)
    headers: dict[str, str] = {}
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, (int, float)) and retry_after >= 0:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if getattr(error, "close_connection", False):  # a server shutting down
        headers["Connection"] = "close"
    code = "context_length_exceeded" if "context" in str(error) and status == 400 else None
    return error_response(status, str(error), headers or None, code=code)


def _validation_error(error: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) of the first problem, naming the field: ``top_k: Input
    should be ...``; FastAPI lists every problem, a client needs the first to fix it."""
    errors = list(error.errors())
    # a union reports every member it tried: a mismatch of type ("string_type") on one
    # member says less than a real problem ("invalid_text") on another
    specific = [e for e in errors if not str(e["type"]).endswith("_type")]
    for e in specific[:1] or errors:
        kind = e["type"]
        if kind == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", e["msg"])
            return f"the body is not valid JSON ({reason})", None, "invalid_json"
        where = [str(part) for part in e["loc"] if part != "body"]
        # a union of types reports the member it tried (``str``, ``list[str]``): not a field
        where = [part for part in where if not _is_type_name(part)]
        if kind == "string_unicode" and not where:  # a field's name, not its value
            name = str(e.get("input", ""))
            bad = next((c for c in name if 0xD800 <= ord(c) <= 0xDFFF), "\ud800")
            return (
                f"a field name holds a lone surrogate (U+{ord(bad):04X}), which is not valid "
                "Unicode: send the name as text",
                None,
                "invalid_json",
            )
        if not where:
            return (
                "the body must be a JSON object (with curl, send -H 'Content-Type: "
                "application/json')",
                None,
                "invalid_json" if kind != "model_attributes_type" else None,
            )
        param = ".".join(where)
        if kind == "extra_forbidden":
            return (
                f"{param}: unknown parameter; this server takes the fields its /openapi.json lists",
                param,
                "unknown_parameter",
            )
        message = str(e["msg"]).removeprefix("Value error, ")
        code = kind if kind in ("unsupported_parameter", "invalid_text") else None
        return f"{param}: {message}", param, code
    return "invalid request", None, None


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict") or "[" in part


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes OpenAI's error body; unexpected ones say only that."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_error(exc)
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(ApiError)
    async def refused_by_us(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers, param=exc.param, code=exc.code)

    @app.exception_handler(HTTPException)
    async def refused(_request: Request, exc: HTTPException) -> JSONResponse:
        status = 400 if exc.status_code == 422 else exc.status_code
        return error_response(status, str(exc.detail), exc.headers)

    @app.exception_handler(KnnlmError)
    async def knnlmerror_response(_request: Request, exc: KnnlmError) -> JSONResponse:
        return knnlm_error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette raises the exception again after this answer: the server logs its traceback
        return error_response(500, "internal error; the server log has the details")
