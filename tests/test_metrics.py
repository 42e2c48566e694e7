"""``knnlm serve``'s observability: ``/metrics``, ``/version`` and the JSON access log.

One collection per embedded engine, with the gate of tests/test_service.py saved in it, and
one session; each test makes apps of its own over it, so its counts start at zero. After
known requests, ``/metrics`` is parsed with prometheus_client's own parser and must count
exactly: requests by route template and status, latencies, the batcher's forwards and
batches, and the gate's searches and skips as the ``/v1/score`` answers show them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import clean_environment, tiny_collection
from tests.test_service import AUTH, CODE, PROSE, SECRET, _save_a_policy

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Observed:
    engine: str
    session: Any
    apps: list[Any] = field(default_factory=list)

    def app(self) -> Any:
        """A new app over the session: its own batcher and its own metrics."""
        from knnlm.service.app import create_app

        app = create_app(self.session, api_key=SECRET, max_batch=64, batch_wait_ms=50)
        self.apps.append(app)
        return app


@pytest.fixture(scope="module", params=["edge", "local"])
def observed(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Observed]:
    from knn_store import open_session

    engine = request.param
    root = tmp_path_factory.mktemp(f"metrics-{engine}")
    with clean_environment():
        settings = tiny_collection(root, tiny_models["gpt2"], backend=engine).settings
        _save_a_policy(settings)  # a gate that skips some of CODE's positions
        observed = Observed(engine, open_session(settings))
        try:
            yield observed
        finally:
            for app in observed.apps:
                app.state.batcher.close()
            observed.session.close()


def _client(app: Any, headers: dict[str, str] | None = AUTH) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://knnlm", headers=headers
    )


async def _scrape(client: httpx.AsyncClient) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _labels(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for sample, key in samples if sample == name}


# --- requests -------------------------------------------------------------------------------


def test_requests_are_counted_by_route_template_and_status(observed: Observed) -> None:
    app = observed.app()
    templated = next(
        (r.path for r in app.routes if "{" in r.path and "GET" in getattr(r, "methods", ())),
        None,
    )

    async def go() -> tuple[Samples, Samples, int]:
        async with _client(app) as client, _client(app, headers=None) as anonymous:
            for _ in range(2):
                assert (await client.post("/v1/score", json={"text": PROSE})).status_code == 200
            assert (await anonymous.post("/v1/score", json={"text": PROSE})).status_code == 401
            bad = (await client.post("/v1/score", json={"text": 5})).status_code
            assert (await anonymous.get("/healthz")).status_code == 200
            assert (await client.get("/no/such/path-a7")).status_code == 404
            if templated is not None:  # a client-chosen id must not become a label
                path = templated.split("{")[0] + "client-chosen-id-a7"
                await client.get(path)
            first = await _scrape(client)
            second = await _scrape(client)
        return first, second, bad

    first, second, bad = asyncio.run(go())
    assert 400 <= bad < 500
    requests = "knnlm_http_requests_total"
    assert _get(first, requests, route="/v1/score", status="200") == 2
    assert _get(first, requests, route="/v1/score", status="401") == 1  # the guard's refusal
    assert _get(first, requests, route="/v1/score", status=str(bad)) == 1
    assert _get(first, requests, route="/healthz", status="200") == 1
    assert _get(first, requests, route="unmatched", status="404") == 1
    routes = _labels(first, requests, "route")
    assert not any("a7" in route for route in routes)  # raw paths never become labels
    if templated is not None:
        assert templated in routes
    assert "/metrics" not in routes  # a scrape is counted once it is answered:
    assert _get(second, requests, route="/metrics", status="200") == 1
    assert _get(first, "knnlm_http_requests_in_progress") == 1  # the scrape itself
    latency = "knnlm_http_request_duration_seconds"
    assert _get(first, f"{latency}_count", route="/v1/score") == 4
    assert _get(first, f"{latency}_bucket", route="/v1/score", le="+Inf") == 4
    assert _get(first, f"{latency}_sum", route="/v1/score") > 0
    assert _get(first, f"{latency}_count", route="/healthz") == 1


def test_metrics_and_version_want_the_api_key(observed: Observed) -> None:
    app = observed.app()

    async def go() -> list[int]:
        async with _client(app, headers=None) as anonymous:
            return [(await anonymous.get(path)).status_code for path in ("/metrics", "/version")]

    assert asyncio.run(go()) == [401, 401]


# --- the worker -----------------------------------------------------------------------------


def test_worker_metrics_equal_the_answers(observed: Observed) -> None:
    from knn_store.windows import sliding_windows

    app = observed.app()
    scores = [{"text": CODE}, {"text": PROSE}, {"text": CODE, "lambda": 0.6}]
    prompts = ["def add(a, b):\n   ", "for i in"]

    async def go() -> tuple[list[Any], Any, list[Any], Samples]:
        async with _client(app) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/score", json=body) for body in scores),
                client.post("/v1/explain", json={"text": PROSE, "top": 2, "neighbours": 2}),
                *(
                    client.post(
                        "/v1/completions",
                        json={"prompt": p, "max_tokens": 6, "temperature": 0},
                    )
                    for p in prompts
                ),
            )
            for answer in answers:
                assert answer.status_code == 200, answer.text
            bodies = [answer.json() for answer in answers]
            return bodies[:3], bodies[3], bodies[4:], await _scrape(client)

    scored, explained, completed, samples = asyncio.run(go())
    stats = app.state.batcher.stats
    assert _get(samples, "knnlm_lm_forwards_total") == stats.lm_forwards > 0
    assert _get(samples, "knnlm_batches_total") == stats.batches
    assert _get(samples, "knnlm_jobs_total") == stats.requests == 6
    assert _get(samples, "knnlm_queue_depth") == 0
    assert _get(samples, "knnlm_worker_up") == 1
    assert _get(samples, "knnlm_worker_busy_seconds_total") > 0

    # batch sizes: one observation per batch; jobs add up to the requests, rows to the
    # windows of the texts and to the prompts
    knn_lm = observed.session.knn_lm
    windows = {
        kind: sum(
            len(list(sliding_windows(len(knn_lm.lm.encode(t)), window=knn_lm.window,
                                     stride=knn_lm.stride)))
            for t in texts
        )
        for kind, texts in (("score", [b["text"] for b in scores]), ("explain", [PROSE]))
    }  # fmt: skip
    kinds = ("score", "explain", "complete")
    assert sum(_get(samples, "knnlm_batch_jobs_count", kind=k) for k in kinds) == stats.batches
    assert sum(_get(samples, "knnlm_batch_jobs_sum", kind=k) for k in kinds) == 6
    assert _get(samples, "knnlm_batch_jobs_sum", kind="score") == 3
    assert _get(samples, "knnlm_batch_rows_sum", kind="score") == windows["score"]
    assert _get(samples, "knnlm_batch_rows_sum", kind="explain") == windows["explain"]
    assert _get(samples, "knnlm_batch_rows_sum", kind="complete") == len(prompts)
    for kind in kinds:
        count = _get(samples, "knnlm_batch_jobs_count", kind=kind)
        assert _get(samples, "knnlm_batch_jobs_bucket", kind=kind, le="+Inf") == count >= 1

    # searches: every scored token was searched or skipped by the gate, as the answers say
    tokens = sum(body["tokens_count"] for body in scored)
    skipped = sum(not s for body in scored for s in body["searched"])
    assert 0 < skipped < tokens  # the saved gate skips some, the fixed lambda none
    assert _get(samples, "knnlm_tokens_scored_total", kind="score") == tokens
    assert _get(samples, "knnlm_searches_skipped_total", kind="score") == skipped
    assert _get(samples, "knnlm_searches_total", kind="score") == tokens - skipped
    explained_tokens = len(explained["tokens"])
    assert _get(samples, "knnlm_tokens_scored_total", kind="explain") == explained_tokens
    assert (
        _get(samples, "knnlm_searches_total", kind="explain")
        + _get(samples, "knnlm_searches_skipped_total", kind="explain")
    ) == explained_tokens
    # generation: one gate decision per token of every row
    generated = sum(body["usage"]["completion_tokens"] for body in completed)
    assert generated > 0
    assert _get(samples, "knnlm_tokens_generated_total") == generated
    assert (
        _get(samples, "knnlm_searches_total", kind="complete")
        + _get(samples, "knnlm_searches_skipped_total", kind="complete")
    ) == generated


def test_two_apps_count_apart(observed: Observed) -> None:
    from prometheus_client import REGISTRY

    first, second = observed.app(), observed.app()
    assert first.state.metrics is not second.state.metrics

    async def go() -> tuple[Samples, Samples]:
        async with _client(first) as a, _client(second) as b:
            for _ in range(3):
                assert (await a.get("/healthz")).status_code == 200
            assert (await a.post("/v1/score", json={"text": PROSE})).status_code == 200
            return await _scrape(a), await _scrape(b)

    seen_first, seen_second = asyncio.run(go())
    requests = "knnlm_http_requests_total"
    assert _get(seen_first, requests, route="/healthz", status="200") == 3
    assert _get(seen_second, requests, route="/healthz", status="200") == 0
    assert _get(seen_first, "knnlm_jobs_total") == 1
    assert _get(seen_second, "knnlm_jobs_total") == 0
    assert _get(seen_second, "knnlm_lm_forwards_total") == 0
    # nothing went to prometheus_client's process-wide registry
    assert not any(name.startswith("knnlm_") for name in REGISTRY._names_to_collectors)


# --- /version -------------------------------------------------------------------------------


def test_version_names_what_answers(observed: Observed) -> None:
    import torch
    import transformers

    app = observed.app()

    async def go() -> httpx.Response:
        async with _client(app) as client:
            return await client.get("/version")

    response = asyncio.run(go())
    assert response.status_code == 200, response.text
    got = response.json()
    session = observed.session
    assert got["knnlm"] == version("knnlm")
    assert got["model"] == session.lm.name
    assert got["model_fingerprint"] == session.store.meta.model_fingerprint
    assert got["collection"] == "test"
    assert got["backend"] == observed.engine
    engine = {"edge": ("Qdrant Edge", "qdrant-edge-py"), "local": ("local", "qdrant-client")}
    name, package = engine[observed.engine]
    assert name in got["engine"]
    assert got["engine_version"] == version(package)
    assert got["qdrant_client"] == version("qdrant-client")
    assert got["torch"] == torch.__version__
    assert got["transformers"] == transformers.__version__
    assert got["device"] == str(session.lm.device)
    assert SECRET not in response.text
    assert str(session.settings.data_dir) not in response.text  # no location


# --- the access log -------------------------------------------------------------------------


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The JSON access log, into a string; the logger is put back as it was after."""
    from knnlm.service.access_log import LOGGER_NAME, json_access_log

    logger = logging.getLogger(LOGGER_NAME)
    before = (logger.level, logger.propagate)
    stream = io.StringIO()
    with json_access_log(stream) as handler:
        yield stream
    assert (logger.level, logger.propagate) == before and handler not in logger.handlers


def test_json_access_log_has_one_line_per_request_and_no_secret(
    observed: Observed, access_log: io.StringIO
) -> None:
    app = observed.app()
    body_marker, query_marker, wrong_key = "body-marker-31e9", "query-marker-8c2d", "wrong-4b7f"

    async def go() -> list[httpx.Response]:
        async with _client(app) as client, _client(app, headers=None) as anonymous:
            return [
                await client.post(
                    f"/v1/score?token={query_marker}",
                    json={"text": f"x = 1  # {body_marker}\n"},
                    headers={"X-Request-ID": "client-id-1"},
                ),
                await anonymous.post(
                    "/v1/score",
                    json={"text": body_marker},
                    headers={"Authorization": f"Bearer {wrong_key}"},
                ),
                await anonymous.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"}),
            ]

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200, 401, 200]
    text = access_log.getvalue()
    for secret in (SECRET, wrong_key, body_marker, query_marker, "Bearer"):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3
    for line, response in zip(lines, responses, strict=True):
        assert set(line) == {
            "time", "method", "route", "status", "duration_ms", "bytes", "request_id", "client"
        }  # fmt: skip
        assert line["status"] == response.status_code
        assert line["route"] == str(response.request.url.path)
        assert line["request_id"] == response.headers["x-request-id"]
        assert line["bytes"] == len(response.content)
        assert line["duration_ms"] >= 0
        assert line["time"].endswith("Z")
        assert line["client"].startswith("127.0.0.1:")
    assert [line["method"] for line in lines] == ["POST", "POST", "GET"]
    assert lines[0]["request_id"] == "client-id-1"  # the client's own id, kept
    assert lines[2]["request_id"] != "bad id\nwith newline"  # not a plain one: replaced
    assert len(lines[2]["request_id"]) == 32


def test_serve_offers_the_access_log() -> None:
    from click.testing import CliRunner

    from knnlm.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    assert "--access-log [uvicorn|json|off]" in result.output
    refused = CliRunner().invoke(cli, ["serve", "--access-log", "xml"])
    assert refused.exit_code == 2  # a usage error, before anything is opened
