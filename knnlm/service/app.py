"""The HTTP API over one open ``Session``: ``create_app(session)`` gives a FastAPI app.

Routes are thin: knnlm's own (``/v1/score``, ``/v1/explain``, ``/v1/collection``, the
probes) validate and tokenize here, then wait on the ``Batcher``, whose one worker thread
runs the model for every request together (see ``batcher``); the OpenAI-compatible ones
(``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) hand their request to
``openai_serving``, with the bodies of ``openai_protocol``. Every refusal is OpenAI's error
body (see ``errors``); no traceback ever reaches a client. A body that parses as JSON is
read as JSON whatever its content type (``json_body``). With an API key, every route but
the health probes and the page wants ``Authorization: Bearer <key>``; the key is never logged or
echoed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from knn_store.errors import ConfigError
from knn_store.results import TokenScores
from knnlm.service.batcher import Batcher, KnnOptions
from knnlm.service.errors import ApiError, error_response, install_error_handlers, one_line
from knnlm.service.guard import Guard
from knnlm.service.json_body import JsonBody
from knnlm.service.metrics import install_metrics
from knnlm.service.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from knnlm.service.openai_serving import OpenAIServing
from knnlm.service.page import install_page
from knnlm.service.schemas import (
    RENAMED_ON,
    SCORE_RENAMED,
    ExplainRequest,
    ExplainResponse,
    Health,
    Ready,
    ScoreRequest,
    ScoreResponse,
    error_responses,
)
from knnlm.service.version import install_version
from knnlm.service.waiting import check_explain, result_or_cancel

if TYPE_CHECKING:
    from knn_store.session import Session


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 1_000_000
    max_text_tokens: int = 8192  # of a text or prompt, BOS included
    max_completion_tokens: int = 512  # max_tokens of a completion
    max_choices: int = 16  # prompts times n of one completion request
    body_timeout: float = 30.0  # seconds for a body to arrive once its headers have (408)
    request_timeout: float = 300.0  # seconds from a job's submission to its answer (504)
    max_queue: int = 256  # requests waiting for the model at most (429 past it)
    max_explain_cells: int = 32_768  # tokens x (neighbours + top) of an explain (413)


def create_app(
    session: Session,
    *,
    api_key: str | None = None,
    limits: Limits = Limits(),
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
    batch_invariant: bool = False,
) -> FastAPI:
    """The API over ``session``, which the caller opens before and closes after.

    The batcher's worker starts with the first request (or the server's startup) and stops
    at the server's shutdown; ``app.state.batcher`` holds it and its ``stats``.
    """
    if api_key is not None and not api_key.strip():
        raise ConfigError("the server's API key is empty: give a key, or none")
    batcher = Batcher(
        session,
        max_batch=max_batch,
        max_wait=batch_wait_ms / 1000,
        max_pending=limits.max_queue,
        request_timeout=limits.request_timeout,
        batch_invariant=batch_invariant,
    )
    lm = session.lm
    serving = OpenAIServing(
        batcher,
        lm,
        collection=session.settings.collection,
        max_completion_tokens=limits.max_completion_tokens,
        max_text_tokens=limits.max_text_tokens,
        max_choices=limits.max_choices,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    app = FastAPI(
        title="knnlm",
        version=version("knnlm"),
        summary="A kNN-LM over HTTP: score, complete and explain text with retrieval; "
        "OpenAI-compatible completions, chat completions and models.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.session = session
    app.state.serving = serving
    app.add_middleware(JsonBody)  # inside the guard: it sees the body the guard bounded
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        body_timeout=limits.body_timeout,
        shutdown_deadline=lambda: batcher.drain_deadline,  # bodies stop being awaited then
    )
    install_error_handlers(app)
    install_page(app)  # GET /: the page that shows what the memory did
    install_metrics(app, batcher)  # GET /metrics; after add_middleware, to see the guard's 401s
    install_version(app, session)  # GET /version

    async def encode(text: str, field: str) -> np.ndarray:
        ids = await run_in_threadpool(lm.encode, text)
        if len(ids) > limits.max_text_tokens:
            raise ApiError(
                413,
                f"{field}: {len(ids):,} tokens, more than this server takes "
                f"({limits.max_text_tokens:,})",
                param=field,
            )
        return ids

    @app.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health)
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.api_route(
        "/readyz", methods=["GET", "HEAD"], response_model=Ready, responses=error_responses(503)
    )
    async def readyz() -> Ready | JSONResponse:
        """The model worker runs and the store answers a count."""
        if not batcher.healthy:
            return error_response(503, "the model worker is not running")
        try:
            points = await run_in_threadpool(session.store.count)
        except Exception as exc:  # a closed or unreachable store: not ready, whatever it is
            return error_response(503, f"the store does not answer: {one_line(exc)}")
        return Ready(status="ready", points=points, **batcher.stats.to_dict())

    @app.get("/v1/collection", responses=error_responses(401, 503))
    async def collection() -> dict[str, Any]:
        """The collection, as `knnlm info --json` shows it, less where it lives on the
        server's side (a path of its disk, or its Qdrant's URL): no client needs that."""
        from knn_store.summary import collection_summary

        summary = await run_in_threadpool(
            collection_summary, session.store, backend=session.settings.backend
        )
        summary.pop("location", None)
        return summary

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=error_responses(400, 401, 413, 429, 503),
    )
    async def score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse:
        """Per-token log-probabilities and perplexities of the LM and the kNN-LM, the
        numbers `knnlm eval` gives for the same text and flags. The older names
        `temperature` and `top_k` still work, answered with `Deprecation` and `Warning`
        headers that name the new ones."""
        ids = await encode(body.text, "text")
        if old := body.deprecated_names():
            response.headers["Deprecation"] = RENAMED_ON
            response.headers["Warning"] = ", ".join(
                f'299 knnlm "{name} is deprecated here: send {SCORE_RENAMED[name]}"' for name in old
            )
        options = KnnOptions(
            lmbda=body.lmbda, temperature=body.softmax_temperature, top_k=body.neighbours
        )
        result = await result_or_cancel(request, batcher.score(ids, options), batcher)
        pieces = await run_in_threadpool(lm.tokenizer.batch_decode, result.targets[:, None])
        return _score_response(result, pieces)

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses=error_responses(400, 401, 413, 429, 503),
    )
    async def explain(body: ExplainRequest, request: Request) -> dict[str, Any]:
        """Per token: both distributions, lambda and the nearest neighbours, the lines of
        `knnlm explain --json`; at most tokens x (neighbours + top) entries
        (`--max-explain-cells`), and no more neighbours than the server retrieves."""
        ids = await encode(body.text, "text")
        shown = {"top": body.top, "neighbours": body.neighbours}
        check_explain(len(ids) - 1, **shown, k=session.knn_lm.k, max_cells=limits.max_explain_cells)
        rows = await result_or_cancel(request, batcher.explain(ids, **shown), batcher)
        return {"tokens": [row.to_dict() for row in rows]}

    # --- OpenAI-compatible ----------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    async def models() -> ModelList:
        """The one model served: the LM's name, with the kNN-LM's datastore."""
        return serving.models()

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        responses=error_responses(401, 404),
    )
    async def model(model_id: str) -> ModelCard:
        """The served model, or a 404 (code ``model_not_found``) for another id."""
        return serving.model(model_id)

    events = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or events"}}

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**error_responses(400, 401, 404, 413, 429, 503, 504), **events},
    )
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue prompts (OpenAI's completions API) with the kNN-LM, as `knnlm generate`
        would with the same seed; ``stream`` sends server-sent events."""
        return await serving.completions(body, request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**error_responses(400, 401, 404, 413, 429, 503, 504), **events},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Reply to a conversation (OpenAI's chat completions API): the model's own chat
        template makes the prompt, the kNN-LM decodes the reply."""
        return await serving.chat(body, request)

    _openapi_without_422(app)
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; this server answers validation
    errors with OpenAI's 400 instead, so the schema says so."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- responses ------------------------------------------------------------------------------


def _score_response(result: TokenScores, pieces: list[str]) -> ScoreResponse:
    knn_perplexity = _finite(result.knn_perplexity)
    note = None
    if knn_perplexity is None:
        zero = int(np.isneginf(result.knn_log_probs).sum())
        note = (
            f"{zero} tokens got probability 0 (perplexity inf; their knn_logprobs are null): "
            "with lambda 1 the LM has no say, and no neighbour predicted them; use a lambda "
            "below 1"
        )
    return ScoreResponse(
        tokens=pieces,
        base_logprobs=[_finite(x) for x in result.base_log_probs.tolist()],
        knn_logprobs=[_finite(x) for x in result.knn_log_probs.tolist()],
        lambdas=result.lambdas.tolist(),
        searched=result.searched.tolist(),
        tokens_count=result.tokens,
        base_perplexity=_finite(result.base_perplexity),
        knn_perplexity=knn_perplexity,
        note=note,
    )


def _finite(x: float) -> float | None:
    """JSON has no infinities: null stands for them."""
    return x if np.isfinite(x) else None
