"""``knnlm serve``: the kNN-LM over HTTP (``knnlm.service``), on uvicorn."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from knn_store.errors import ConfigError
from knnlm.options import (
    LEVER_OPTIONS,
    MODEL_OPTIONS,
    SEARCH_OPTIONS,
    STORE_OPTIONS,
    options,
    search_domain_option,
    settings_from,
)

if TYPE_CHECKING:
    from knnlm.service.batcher import Batcher


@click.command()
@click.option(
    "--host",
    envvar="KNNLM_SERVE_HOST",
    show_envvar=True,
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on.",
)
@click.option(
    "--port",
    envvar="KNNLM_SERVE_PORT",
    show_envvar=True,
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port.",
)
@click.option(
    "--max-batch",
    envvar="KNNLM_SERVE_MAX_BATCH",
    show_envvar=True,
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Windows (scoring) or prompts (completions) of concurrent requests that share one "
    "LM forward; memory grows with it.",
)
@click.option(
    "--batch-wait-ms",
    envvar="KNNLM_SERVE_BATCH_WAIT_MS",
    show_envvar=True,
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.0, 1000.0),
    help="How long a request may wait for others to share its batch.",
)
@click.option(
    "--max-body-bytes",
    envvar="KNNLM_SERVE_MAX_BODY_BYTES",
    show_envvar=True,
    default=1_000_000,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body.",
)
@click.option(
    "--max-text-tokens",
    envvar="KNNLM_SERVE_MAX_TEXT_TOKENS",
    show_envvar=True,
    default=8192,
    show_default=True,
    type=click.IntRange(2),
    help="Most tokens of a text or prompt.",
)
@click.option(
    "--max-completion-tokens",
    envvar="KNNLM_SERVE_MAX_COMPLETION_TOKENS",
    show_envvar=True,
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Largest max_tokens of a completion.",
)
@click.option(
    "--max-queue",
    envvar="KNNLM_SERVE_MAX_QUEUE",
    show_envvar=True,
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Requests that may wait for the model; one more gets 429 with a Retry-After header "
    "(seconds), so clients back off instead of piling up.",
)
@click.option(
    "--request-timeout",
    envvar="KNNLM_SERVE_REQUEST_TIMEOUT",
    show_envvar=True,
    default=300.0,
    show_default=True,
    type=click.FloatRange(0.0, 86_400.0, min_open=True),
    help="Seconds a request may take from the moment it queues: past it the answer is 504 "
    "and its row leaves its batch (a stream ends with an error event).",
)
@click.option(
    "--body-timeout",
    envvar="KNNLM_SERVE_BODY_TIMEOUT",
    show_envvar=True,
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.0, 3600.0, min_open=True),
    help="Seconds a request body may take to arrive, stalled or trickling; past it the "
    "answer is 408 and the connection is closed.",
)
@click.option(
    "--max-explain-cells",
    envvar="KNNLM_SERVE_MAX_EXPLAIN_CELLS",
    show_envvar=True,
    default=32_768,
    show_default=True,
    type=click.IntRange(1),
    help="Largest /v1/explain answer, in tokens x (neighbours + top): 250 tokens with 3 "
    "neighbours and top 3 are 1,500; each neighbour costs a few hundred bytes of JSON. "
    "Past it the answer is 413.",
)
@click.option(
    "--shutdown-timeout",
    envvar="KNNLM_SERVE_SHUTDOWN_TIMEOUT",
    show_envvar=True,
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.0, 3600.0, min_open=True),
    help="On SIGTERM or Ctrl-C: stop listening, finish the requests that fit in this many "
    "seconds, answer the rest 503, and exit. A second signal exits at once.",
)
@click.option(
    "--batch-invariant",
    envvar="KNNLM_SERVE_BATCH_INVARIANT",
    show_envvar=True,
    is_flag=True,
    help="Run every request in LM forwards of its own, shaped as if it were alone, so its "
    "numbers are the same to the bit however many requests arrive together (no batching: "
    "slower under load). Batched, they agree to float rounding: log-probabilities within "
    "1e-3, perplexities within 1e-5 relative.",
)
@click.option(
    "--serve-api-key",
    envvar="KNNLM_SERVE_API_KEY",
    help="Require 'Authorization: Bearer KEY' of clients (not on /healthz, /readyz or the "
    "page at /, which asks for it); prefer the KNNLM_SERVE_API_KEY variable, which no process "
    "list shows. (--api-key is Qdrant's.)",
)
@click.option(
    "--access-log",
    envvar="KNNLM_SERVE_ACCESS_LOG",
    show_envvar=True,
    type=click.Choice(["uvicorn", "json", "off"]),
    default="uvicorn",
    show_default=True,
    help="One line per request on stderr: uvicorn's text, or JSON (time, method, route, status, "
    "duration_ms, bytes, request_id, client; never a header or body), or none.",
)
@search_domain_option
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *SEARCH_OPTIONS, *LEVER_OPTIONS)
def serve(
    host: str,
    port: int,
    max_batch: int,
    batch_wait_ms: float,
    max_body_bytes: int,
    max_text_tokens: int,
    max_completion_tokens: int,
    max_queue: int,
    request_timeout: float,
    body_timeout: float,
    max_explain_cells: int,
    shutdown_timeout: float,
    batch_invariant: bool,
    serve_api_key: str | None,
    access_log: str,
    search_domains: tuple[str, ...],
    **params: Any,
) -> None:
    """Serve the kNN-LM over HTTP: /v1/score, /v1/explain, /v1/collection, OpenAI's
    /v1/completions, /v1/chat/completions and /v1/models, /metrics (Prometheus), /version,
    /healthz and /readyz; the API is described at /docs, and / is a page that shows what
    the memory did for a text (open it in a browser).

    Requests that arrive together share LM forwards and searches. Scores equal `knnlm
    eval`'s with the same flags (to float rounding when batched; to the bit with
    --batch-invariant), completions `knnlm generate`'s with the same seed. The collection's
    tuned policy applies unless --lambda/--temperature/--no-gate say otherwise. A client
    that disconnects is cancelled; every request has a deadline (--request-timeout), the
    queue a bound (--max-queue). Ctrl-C or SIGTERM stops it within --shutdown-timeout.

    \b
    Examples:
      knnlm serve --collection kernel-docs --port 8000
      KNNLM_SERVE_API_KEY=... knnlm serve --host 0.0.0.0
      curl -s localhost:8000/v1/score -H 'Content-Type: application/json' \\
          -d '{"text": "The scheduler"}'
      curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}'
    """
    import uvicorn

    from knn_store import open_session
    from knnlm.service.app import Limits, create_app
    from knnlm.service.http_protocol import protocol_class

    # click reads an empty variable as unset, which would serve without a key
    key = serve_api_key if serve_api_key is not None else os.environ.get("KNNLM_SERVE_API_KEY")
    if key is not None and not key.strip():
        raise ConfigError(
            "the service's API key (--serve-api-key, KNNLM_SERVE_API_KEY) is empty: give a "
            "key, or unset it to serve without one"
        )
    settings = settings_from(params)
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_text_tokens=max_text_tokens,
        max_completion_tokens=max_completion_tokens,
        body_timeout=body_timeout,
        request_timeout=request_timeout,
        max_queue=max_queue,
        max_explain_cells=max_explain_cells,
    )
    logging_requests: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if access_log == "json":
        import sys

        from knnlm.service.access_log import json_access_log

        logging_requests = json_access_log(sys.stderr)
    with logging_requests, open_session(settings, search_domains=search_domains) as session:
        app = create_app(
            session,
            api_key=serve_api_key,
            limits=limits,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            batch_invariant=batch_invariant,
        )
        auth = "API key required" if serve_api_key else "no API key"
        click.echo(
            f"knnlm: serving {settings.collection!r} on http://{host}:{port} ({auth}; "
            f"{session.describe()})",
            err=True,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=protocol_class(),
            log_level="info",
            access_log=access_log == "uvicorn",
            timeout_graceful_shutdown=shutdown_timeout * _GRACE_SHARE,  # type: ignore[arg-type]
        )
        server = _server_class()(
            config, batcher=app.state.batcher, shutdown_timeout=shutdown_timeout
        )
        with _until_a_signal():
            server.run()
    click.echo("knnlm: server stopped", err=True)


# Of --shutdown-timeout: the batcher refuses what is left at _DRAIN_SHARE of it, so handlers
# still have time to send their 503s before uvicorn cancels what remains at _GRACE_SHARE.
_DRAIN_SHARE, _GRACE_SHARE = 0.8, 0.9
_FORCED_GRACE = 1.0  # seconds a second signal leaves requests to answer 503


def _server_class() -> type[Any]:
    """uvicorn's Server with a shutdown deadline for the model's work too, and a second
    signal (SIGTERM as well as uvicorn's SIGINT) that stops at once. Built on call, so
    that uvicorn loads only when the command runs."""
    import asyncio
    import time

    import uvicorn

    class Server(uvicorn.Server):
        def __init__(
            self, config: uvicorn.Config, *, batcher: Batcher, shutdown_timeout: float
        ) -> None:
            super().__init__(config)
            self.batcher = batcher
            self.shutdown_timeout = shutdown_timeout

        def handle_exit(self, sig: int, frame: Any) -> None:
            # in a signal handler: only flags here (the batcher's lock may be held)
            if self.should_exit:  # the second signal: no more waiting for anyone
                self.force_exit = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            self.batcher.drain(self.shutdown_timeout * _DRAIN_SHARE)
            await super().shutdown(sockets)
            if self.force_exit:
                # refuse everything now: requests answer their 503s within a moment (a
                # body being read, at the guard's next look), instead of being cancelled
                # with a traceback each; then the app's shutdown, without waiting for a
                # forward in hand (the worker thread is a daemon)
                self.batcher.drain(0.0)
                deadline = time.monotonic() + _FORCED_GRACE
                while self.server_state.tasks and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                self.batcher.close(timeout=0.0)
                await self.lifespan.shutdown()

    return Server


@contextmanager
def _until_a_signal() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again.
    Both end here as a normal stop, SIGTERM included, so the session closes after it."""
    main = threading.current_thread() is threading.main_thread()  # only it handles signals
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
