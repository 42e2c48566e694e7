"""``GET /metrics``: what the server and its model worker did, for Prometheus.

Every app gets its own ``CollectorRegistry`` (``app.state.metrics``), never the library's
global one, so two apps in one process (the tests, a second collection) count apart. The
numbers come from two places:

- ``Observer``, a pure ASGI middleware around every other, times each request and counts it
  by route *template* (``/v1/models/{model}``, never the raw path, so clients cannot grow the
  label set) and status, the guard's 401 and 413 included; it also writes the optional
  access log (``access_log``) and gives every answer an ``X-Request-ID``;
- ``BatcherCollector`` reads the batcher's ``BatchStats`` when Prometheus scrapes, so the
  model's worker thread only adds to plain integers and never waits on a metrics lock.

Metrics (label sets in braces; every counter also has Prometheus' ``_created``):

- ``knnlm_http_requests_total{route,status}`` counter; ``route`` is ``unmatched`` for a path
  no route takes;
- ``knnlm_http_request_duration_seconds{route}`` histogram, to the last byte (streams too);
- ``knnlm_http_requests_in_progress`` gauge;
- ``knnlm_queue_depth`` gauge: jobs waiting for the model worker;
- ``knnlm_worker_up`` gauge: 1 while the model worker can take jobs;
- ``knnlm_jobs_total``, ``knnlm_batches_total``, ``knnlm_lm_forwards_total`` counters: the
  batcher's ``requests``, ``batches`` and ``lm_forwards``;
- ``knnlm_batch_jobs{kind}`` and ``knnlm_batch_rows{kind}`` histograms: jobs per batch, and
  windows (``score``, ``explain``) or prompts (``complete``) per batch;
- ``knnlm_searches_total{kind}``, ``knnlm_searches_skipped_total{kind}`` and
  ``knnlm_searches_followed_total{kind}`` counters: positions searched, positions the
  retrieval gate decided not to search, and positions scored from followed pointers (pointer
  following on); the saved share is ``(rate(skipped) + rate(followed)) / rate(all three)``.
  For ``complete`` they count generated tokens; the prompt walk that pointer following makes
  before the first token is not counted;
- ``knnlm_tokens_scored_total{kind}`` (``score``, ``explain``) and
  ``knnlm_tokens_generated_total`` counters: tokens/s is their ``rate()``;
- ``knnlm_worker_busy_seconds_total`` counter: the worker's time inside batches.

``/metrics`` wants the API key like every route but the health probes: its labels and counts
say what the server is asked and how much, which is not for everyone (Prometheus sends the
key with ``authorization: {credentials: KEY}`` in its scrape config).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from knnlm.service.access_log import log_request
from knnlm.service.http_protocol import SERVER_ANSWERED
from knnlm.service.schemas import error_responses

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from knnlm.service.batcher import Batcher

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UNMATCHED = "unmatched"  # the route label of a path that no route takes
KINDS = ("score", "explain", "complete")  # the batcher's job kinds, shown even before any job
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's own id, taken as it is
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before any answer


@dataclass(frozen=True)
class HttpMetrics:
    """The request metrics of one app, in its own registry."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    in_progress: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HttpMetrics:
        return cls(
            registry=registry,
            requests=Counter(
                "knnlm_http_requests",
                "HTTP requests answered, by route template and status.",
                ["route", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "knnlm_http_request_duration_seconds",
                "Time from a request's arrival to its answer's last byte, by route template.",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            in_progress=Gauge(
                "knnlm_http_requests_in_progress",
                "HTTP requests being answered now.",
                registry=registry,
            ),
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)


class BatcherCollector(Collector):
    """The batcher's ``stats`` and queue as metrics, read at scrape time."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterator[Metric]:
        batcher = self.batcher
        stats = batcher.stats
        with stats.lock:  # one consistent copy: the worker counts on meanwhile
            shapes = dict(stats.shapes)  # (kind, jobs, rows) -> batches
            tokens, searched = dict(stats.tokens), dict(stats.searched)
            skipped, followed = dict(stats.skipped), dict(stats.followed)
        kinds = sorted(set(KINDS) | {kind for kind, _, _ in shapes})

        yield GaugeMetricFamily(
            "knnlm_queue_depth", "Jobs waiting for the model worker.", value=batcher.waiting
        )
        yield GaugeMetricFamily(
            "knnlm_worker_up",
            "1 while the model worker can take jobs, 0 once it stopped or is closing.",
            value=1 if batcher.healthy else 0,
        )
        for name, doc, value in (
            ("knnlm_jobs", "Jobs (requests) the model worker ran.", stats.requests),
            ("knnlm_batches", "Rounds of the model worker, one model call each.", stats.batches),
            ("knnlm_lm_forwards", "LM forward passes (window batches, decoding steps).",
             stats.lm_forwards),
            ("knnlm_worker_busy_seconds", "Seconds the model worker spent running batches.",
             stats.busy_seconds),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=value)
        jobs = HistogramMetricFamily(
            "knnlm_batch_jobs", "Jobs in one batch of the model worker.", labels=["kind"]
        )
        rows = HistogramMetricFamily(
            "knnlm_batch_rows",
            "Windows (score, explain) or prompts (complete) in one batch.",
            labels=["kind"],
        )
        for kind in kinds:
            jobs.add_metric([kind], *_buckets(shapes, kind, lambda j, _r: j))
            rows.add_metric([kind], *_buckets(shapes, kind, lambda _j, r: r))
        yield jobs
        yield rows
        for name, doc, counts in (
            ("knnlm_searches", "Positions searched in the datastore, by job kind.", searched),
            ("knnlm_searches_skipped",
             "Positions the retrieval gate decided not to search, by job kind.", skipped),
            ("knnlm_searches_followed",
             "Positions scored from followed pointers (RetoMaton) instead of a search.",
             followed),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in kinds:
                family.add_metric([kind], counts.get(kind, 0))
            yield family
        scored = CounterMetricFamily(
            "knnlm_tokens_scored", "Tokens scored (score, explain).", labels=["kind"]
        )
        for kind in kinds:
            if kind != "complete":
                scored.add_metric([kind], tokens.get(kind, 0))
        yield scored
        yield CounterMetricFamily(
            "knnlm_tokens_generated", "Tokens generated.", value=tokens.get("complete", 0)
        )


def _buckets(
    shapes: dict[tuple[str, int, int], int], kind: str, size: Callable[[int, int], int]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets and the sum of ``size(jobs, rows)`` over ``kind``'s batches."""
    counts = [(size(j, r), n) for (k, j, r), n in shapes.items() if k == kind]
    buckets = [
        (floatToGoString(bound), float(sum(n for s, n in counts if s <= bound)))
        for bound in BATCH_BUCKETS
    ]
    buckets.append(("+Inf", float(sum(n for _, n in counts))))
    return buckets, float(sum(s * n for s, n in counts))


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route ``scope`` goes to (a wrong method still names its
    route, as the 405 does), or ``UNMATCHED``."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and partial is None:
            partial = str(getattr(route, "path", UNMATCHED))
    return partial or UNMATCHED


class Observer:
    """Around every other middleware: per request, its route, status and duration into
    ``metrics``, one access-log entry, and an ``X-Request-ID`` header on the answer (the
    client's own when it sent a plain one, else a new one)."""

    def __init__(
        self, app: Any, *, routes: Callable[[], Sequence[BaseRoute]], metrics: HttpMetrics
    ):
        self.app = app
        self.routes = routes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = route_template(self.routes(), scope)
        request_id = _request_id(scope)
        status = 500  # what the server's error handler answers when the app raises
        answered = False
        sent = 0

        async def observed(message: Message) -> None:
            nonlocal status, answered, sent
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, observed)
            if not answered:  # the app gave up without an answer: its client had left
                status = _unanswered(scope)
        except asyncio.CancelledError:
            if not answered:  # the client, or the server, left before any answer
                status = _unanswered(scope)
            raise
        except ClientDisconnect:
            # the client left (or timed out) while its body was read: nobody to answer, and
            # no server error either; or uvicorn refused the body's framing with a 400
            if not answered:
                status = _unanswered(scope)
        finally:
            self.metrics.in_progress.dec()
            seconds = time.perf_counter() - started
            self.metrics.observe(route, status, seconds)
            client = scope.get("client")
            log_request(
                {
                    "method": str(scope.get("method", ""))[:16],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "bytes": sent,
                    "request_id": request_id,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                }
            )


def _unanswered(scope: Scope) -> int:
    """The status of a request the app did not answer: the one uvicorn sent itself
    (``http_protocol``), else a client close."""
    return int(scope.get(SERVER_ANSWERED, CLIENT_CLOSED))


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            given = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def install_metrics(app: FastAPI, batcher: Batcher) -> CollectorRegistry:
    """Serve ``GET /metrics`` from a registry of this app's own, and observe every request.

    Call it after the app's other ``add_middleware`` calls: the observer must wrap them to
    count their refusals (the API key's 401, the body limit's 413). Returns the registry,
    also kept as ``app.state.metrics``.
    """
    registry = CollectorRegistry()
    http = HttpMetrics.create(registry)
    registry.register(BatcherCollector(batcher))
    app.state.metrics = registry
    app.add_middleware(Observer, routes=lambda: app.router.routes, metrics=http)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            **error_responses(401),
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        },
    )
    async def metrics() -> Response:
        """Requests, latencies, the queue, batches, LM forwards, searches and tokens, in
        Prometheus' text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
