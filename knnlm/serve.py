"""``knnlm serve``: the kNN-LM over HTTP (``knnlm.service``), on uvicorn."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from knnlm.options import (
    MODEL_OPTIONS,
    SEARCH_OPTIONS,
    STORE_OPTIONS,
    options,
    search_domain_option,
    settings_from,
)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port."
)
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Windows (scoring) or prompts (completions) of concurrent requests that share one "
    "LM forward; memory grows with it.",
)
@click.option(
    "--batch-wait-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.0, 1000.0),
    help="How long a request may wait for others to share its batch.",
)
@click.option(
    "--max-body-bytes",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body.",
)
@click.option(
    "--max-text-tokens",
    default=8192,
    show_default=True,
    type=click.IntRange(2),
    help="Most tokens of a text or prompt.",
)
@click.option(
    "--max-completion-tokens",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Largest max_tokens of a completion.",
)
@click.option(
    "--serve-api-key",
    envvar="KNNLM_SERVE_API_KEY",
    help="Require 'Authorization: Bearer KEY' of clients (not on /healthz, /readyz); prefer "
    "the KNNLM_SERVE_API_KEY variable, which no process list shows. (--api-key is Qdrant's.)",
)
@search_domain_option
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *SEARCH_OPTIONS)
def serve(
    host: str,
    port: int,
    max_batch: int,
    batch_wait_ms: float,
    max_body_bytes: int,
    max_text_tokens: int,
    max_completion_tokens: int,
    serve_api_key: str | None,
    search_domains: tuple[str, ...],
    **params: Any,
) -> None:
    """Serve the kNN-LM over HTTP: /v1/score, /v1/completions, /v1/explain, /v1/collection,
    /healthz and /readyz; the API is described at /docs.

    Requests that arrive together share LM forwards and searches. Scores equal `knnlm
    eval`'s with the same flags, completions `knnlm generate`'s with the same seed. The
    collection's tuned policy applies unless --lambda/--temperature/--no-gate say otherwise.
    Ctrl-C stops it.

    \b
    Examples:
      knnlm serve --collection kernel-docs --port 8000
      KNNLM_SERVE_API_KEY=... knnlm serve --host 0.0.0.0
      curl -s localhost:8000/v1/score -d '{"text": "The scheduler"}'
    """
    import uvicorn

    from knn_store import open_session
    from knnlm.service.app import Limits, create_app

    settings = settings_from(params)
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_text_tokens=max_text_tokens,
        max_completion_tokens=max_completion_tokens,
    )
    with open_session(settings, search_domains=search_domains) as session:
        app = create_app(
            session,
            api_key=serve_api_key,
            limits=limits,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
        )
        auth = "API key required" if serve_api_key else "no API key"
        click.echo(
            f"knnlm: serving {settings.collection!r} on http://{host}:{port} ({auth}; "
            f"{session.describe()})",
            err=True,
        )
        with _until_a_signal():
            uvicorn.run(app, host=host, port=port, log_level="info")
    click.echo("knnlm: server stopped", err=True)


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
