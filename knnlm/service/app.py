"""The HTTP API over one open ``Session``: ``create_app(session)`` gives a FastAPI app.

Handlers validate and tokenize, then wait on the ``Batcher``, whose one worker thread runs
the model for every request together (see ``batcher``). Every refusal is a JSON body
``{"error": "<one line>"}`` with a 4xx status (503 when the store or the worker is not
available); no traceback ever reaches a client. With an API key, every route but the two
health probes wants ``Authorization: Bearer <key>``; the key is never logged or echoed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from knn_store.errors import ConfigError
from knnlm.service.batcher import Batcher, KnnOptions, TokenScores
from knnlm.service.errors import error_response, install_error_handlers, one_line
from knnlm.service.guard import Guard
from knnlm.service.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ExplainRequest,
    ExplainResponse,
    Health,
    Ready,
    ScoreRequest,
    ScoreResponse,
    Usage,
    error_responses,
)

if TYPE_CHECKING:
    from knn_store.session import Session

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 1_000_000
    max_text_tokens: int = 8192  # of a text or prompt, BOS included
    max_completion_tokens: int = 512  # max_tokens of a completion


def create_app(
    session: Session,
    *,
    api_key: str | None = None,
    limits: Limits = Limits(),
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
) -> FastAPI:
    """The API over ``session``, which the caller opens before and closes after.

    The batcher's worker starts with the first request (or the server's startup) and stops
    at the server's shutdown; ``app.state.batcher`` holds it and its ``stats``.
    """
    if api_key is not None and not api_key.strip():
        raise ConfigError("the server's API key is empty: give a key, or none")
    batcher = Batcher(session, max_batch=max_batch, max_wait=batch_wait_ms / 1000)
    lm = session.lm

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
        summary="A kNN-LM over HTTP: score, complete and explain text with retrieval.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.session = session
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    install_error_handlers(app)

    async def encode(text: str, field: str) -> np.ndarray:
        ids = await run_in_threadpool(lm.encode, text)
        if len(ids) > limits.max_text_tokens:
            raise HTTPException(
                413,
                f"{field}: {len(ids):,} tokens, more than this server takes "
                f"({limits.max_text_tokens:,})",
            )
        return ids

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, responses=error_responses(503))
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
        """The collection, as `knnlm info --json` shows it."""
        from knn_store.summary import collection_summary

        return await run_in_threadpool(
            collection_summary, session.store, backend=session.settings.backend
        )

    @app.post(
        "/v1/score", response_model=ScoreResponse, responses=error_responses(401, 413, 422, 503)
    )
    async def score(body: ScoreRequest) -> ScoreResponse:
        """Per-token log-probabilities and perplexities of the LM and the kNN-LM, the
        numbers `knnlm eval` gives for the same text and flags."""
        ids = await encode(body.text, "text")
        options = KnnOptions(lmbda=body.lmbda, temperature=body.temperature, top_k=body.top_k)
        result = await _wait(batcher.score(ids, options))
        pieces = await run_in_threadpool(lm.tokenizer.batch_decode, result.targets[:, None])
        return _score_response(result, pieces)

    @app.post(
        "/v1/explain", response_model=ExplainResponse, responses=error_responses(401, 413, 422, 503)
    )
    async def explain(body: ExplainRequest) -> dict[str, Any]:
        """Per token: both distributions, lambda and the nearest neighbours, the lines of
        `knnlm explain --json`."""
        ids = await encode(body.text, "text")
        rows = await _wait(batcher.explain(ids, top=body.top, neighbours=body.neighbours))
        return {"tokens": [row.to_dict() for row in rows]}

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            **error_responses(401, 413, 422, 503),
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or events"},
        },
    )
    async def completions(body: CompletionRequest) -> Any:
        """Continue a prompt (OpenAI's completions API), as `knnlm generate` would with the
        same seed; ``stream`` sends each token as a server-sent event."""
        from knn_store.generation import Sampling

        if body.max_tokens > limits.max_completion_tokens:
            raise HTTPException(
                422, f"max_tokens: at most {limits.max_completion_tokens} on this server"
            )
        ids = await encode(body.prompt, "prompt")
        sampling = Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            max_new_tokens=body.max_tokens,
        )
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": lm.name,
        }
        if not body.stream:
            tokens = await _wait(batcher.complete(ids, sampling))
            text = await run_in_threadpool(_text, lm, tokens)
            return CompletionResponse(
                **head,
                choices=[CompletionChoice(text=text, finish_reason=_finish(lm, tokens))],
                usage=Usage(
                    prompt_tokens=len(ids),
                    completion_tokens=len(tokens),
                    total_tokens=len(ids) + len(tokens),
                ),
            )
        loop = asyncio.get_running_loop()
        tokens_in: asyncio.Queue[int | None] = asyncio.Queue()

        def push(token: int | None) -> None:  # on the worker thread, or at the end
            if not loop.is_closed():  # after a shutdown, nobody listens
                loop.call_soon_threadsafe(tokens_in.put_nowait, token)

        future = batcher.complete(ids, sampling, on_step=lambda step: push(step.token))
        future.add_done_callback(lambda _: push(None))  # after the last token
        return StreamingResponse(
            _events(lm, head, tokens_in, future),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


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


def _text(lm: Any, tokens: list[int]) -> str:
    """New tokens as text, decoded as `knnlm generate` does."""
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def _finish(lm: Any, tokens: list[int]) -> str:
    return "stop" if tokens and tokens[-1] in lm.stop_ids else "length"


async def _events(
    lm: Any,
    head: dict[str, Any],
    tokens_in: asyncio.Queue[int | None],
    future: Future[list[int]],
) -> AsyncIterator[str]:
    """Server-sent events: a text delta per token, once it decodes to whole characters,
    then the finish reason and ``[DONE]``. The deltas add up to the non-streamed text."""

    def chunk(text: str, finish_reason: str | None) -> str:
        choice = {"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}
        body = {**head, "object": "text_completion", "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    tokens: list[int] = []
    sent = ""
    while (token := await tokens_in.get()) is not None:
        tokens.append(token)
        text = _text(lm, tokens)
        # hold back a split multi-byte character, and text that a later token rewrites
        if text.endswith("\ufffd") or not text.startswith(sent) or text == sent:
            continue
        yield chunk(text[len(sent) :], None)
        sent = text
    error = future.exception()
    if error is not None:
        yield f"data: {json.dumps({'error': one_line(error)})}\n\n"
        return
    final = future.result()
    text = _text(lm, final)
    yield chunk(text[len(sent) :] if text.startswith(sent) else "", _finish(lm, final))
    yield "data: [DONE]\n\n"


async def _wait(future: Future[T]) -> T:
    return await asyncio.wrap_future(future)
