"""Errors as the API answers them: every refusal one JSON line with its status, and no
traceback ever reaching a client."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from knn_store.errors import KnnlmError, StoreError
from knnlm.service.batcher import ServiceUnavailable
from knnlm.service.schemas import ErrorBody


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ErrorBody(error=one_line(message)).model_dump(), status, headers)


def _status(error: KnnlmError) -> int:
    if isinstance(error, (StoreError, ServiceUnavailable)):
        return 503  # the server's trouble, not the request's
    return 422


def _validation_message(error: RequestValidationError) -> str:
    """The first problem, naming the field: ``top_k: Input should be ...``."""
    problems = []
    for e in error.errors():
        if e["type"] == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", e["msg"])
            return f"the body is not valid JSON ({reason})"
        where = [str(part) for part in e["loc"] if part != "body"]
        if not where:
            return "the body must be a JSON object"
        message = str(e["msg"]).removeprefix("Value error, ")
        problems.append(f"{'.'.join(where)}: {message}")
    return "; ".join(problems) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes ``{"error": "<one line>"}``; unexpected ones say only that."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def refused(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(KnnlmError)
    async def knnlmerror_response(_request: Request, exc: KnnlmError) -> JSONResponse:
        return error_response(_status(exc), str(exc))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette raises the exception again after this answer: the server logs its traceback
        return error_response(500, "internal error; the server log has the details")
