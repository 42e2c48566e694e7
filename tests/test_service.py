"""``knnlm serve``'s HTTP API on both embedded engines, with the tiny models.

Each engine gets one collection with a tuned-looking policy and retrieval gate saved in it.
The CLI's answers (`eval`, `explain`, `generate`, `info`) are taken first, since the store
admits one holder at a time; then one session serves the app in-process. The service must
give the CLI's numbers, refuse bad requests with one-line 4xx errors, guard with the API
key without ever showing it, and answer concurrent requests exactly as single ones while
sharing batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CORPUS_LINES
from tests.files import write
from tests.serving import UvicornThread, clean_environment, run_cli, tiny_collection

SECRET = "serve-key-5d1f0a7c93"
AUTH = {"Authorization": f"Bearer {SECRET}"}
CODE = "def add(a, b):\n    return a * b\nfor i in range(10):\n    print(i, i + i)\n"
PROSE = "The quick brown fox jumps over the lazy cat.\n"
STRANGE = "zebra quantum {}{}{} ~~~ 42"
# /v1/score bodies and the `knnlm eval` flags that mean the same
SCORES: list[tuple[dict[str, Any], list[str]]] = [
    ({"text": CODE}, []),
    ({"text": CODE, "lambda": 0.6}, ["--lambda", "0.6"]),
    ({"text": CODE, "knn_temperature": 3.0}, ["--temperature", "3.0"]),
    ({"text": PROSE, "knn_top_k": 3}, ["--top-k", "3"]),
    (
        {"text": PROSE, "lambda": 0.3, "knn_temperature": 0.5, "knn_top_k": 5},
        ["--lambda", "0.3", "--temperature", "0.5", "--top-k", "5"],
    ),
    # the older names, deprecated: the same numbers
    (
        {"text": PROSE, "lambda": 0.3, "temperature": 0.5, "top_k": 5},
        ["--lambda", "0.3", "--temperature", "0.5", "--top-k", "5"],
    ),
]
PROMPT = "def add(a, b):\n   "
SEED = ["--seed", "7"]
# /v1/completions bodies and the `knnlm generate` flags that mean the same
COMPLETIONS: list[tuple[dict[str, Any], list[str]]] = [
    (
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        ["--max-new-tokens", "8", "--sample-temperature", "0"],
    ),
    (
        {"prompt": "for i in", "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 7},
        ["--max-new-tokens", "10", "--sample-temperature", "0.9", "--sample-top-p", "0.95", *SEED],
    ),
    (  # a seed below 0: the CLI's range is the service's too
        {"prompt": "class", "max_tokens": 6, "temperature": 1.0, "seed": -1},
        ["--max-new-tokens", "6", "--sample-temperature", "1.0", "--seed", "-1"],
    ),
]
EXPLAIN = {"text": PROSE, "top": 2, "neighbours": 2}
LIMITS = {"max_body_bytes": 20_000, "max_text_tokens": 120, "max_completion_tokens": 64}


@dataclass
class Served:
    """One engine's app around an open session, and what the CLI answered before."""

    engine: str
    app: Any
    session: Any
    evals: list[dict[str, Any]]
    zero_eval: dict[str, Any]
    explain: list[dict[str, Any]]
    completions: list[str]
    info: dict[str, Any]
    apps: list[Any] = field(default_factory=list)  # every app made, to close its batcher


def _cli(args: list[str], cache: Path) -> dict[str, Any] | list[dict[str, Any]]:
    lines = run_cli(args, cache)
    return lines[0] if len(lines) == 1 and args[0] != "explain" else lines


def _save_a_policy(settings: Any) -> None:
    """A bucket policy and a gate that skips the surer half of CODE's positions, as if
    `knnlm tune` had saved them."""
    from knn_store import load_language_model, open_store
    from knn_store.lambdas import BucketLambda
    from knn_store.saved_policy import SavedPolicy
    from tests.conftest import half_skipping_gate

    gate = half_skipping_gate(load_language_model(settings), CODE)
    with open_store(settings) as store:
        assert store.meta is not None
        policy = SavedPolicy(
            policy=BucketLambda("d_min", [1.0], [0.7, 0.2]),
            temperature=2.0,
            k=8,
            model_fingerprint=store.meta.model_fingerprint,
            key_type=store.meta.key_type,
            gate=gate,
        )
        store.save_policy(policy.to_dict())


@pytest.fixture(scope="module", params=["edge", "local"])
def served(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    from knn_store import open_session
    from knnlm.service.app import Limits, create_app

    engine = request.param
    root = tmp_path_factory.mktemp(f"serve-{engine}")
    with clean_environment():
        made = tiny_collection(root, tiny_models["gpt2"], backend=engine)
        settings, cache, store_flags = made.settings, made.cache, made.store_flags
        flags = [*made.model_flags, *store_flags, "--top-k", "8"]
        generate_flags = ["--model", str(made.settings.model), *store_flags, "--top-k", "8"]
        _save_a_policy(settings)
        evals = []
        for i, (_, extra) in enumerate(SCORES):
            text = write(root / "texts" / f"{i}.txt", SCORES[i][0]["text"])
            evals.append(_cli(["eval", str(text), *flags, *extra, "-q", "--json"], cache))
        strange = write(root / "texts" / "strange.txt", STRANGE)
        zero_eval = _cli(["eval", str(strange), *flags, "--lambda", "1", "-q", "--json"], cache)
        shown = ["--top", "2", "--neighbours", "2"]
        explain = _cli(["explain", "-t", EXPLAIN["text"], *shown, *flags, "--json"], cache)
        completions = [
            _cli(["generate", "-p", body["prompt"], *extra, *generate_flags, "--json"], cache)[
                "completion"
            ]
            for body, extra in COMPLETIONS
        ]
        info = _cli(["info", *store_flags, "--json"], cache)
        session = open_session(settings)
        app = create_app(
            session, api_key=SECRET, limits=Limits(**LIMITS), max_batch=64, batch_wait_ms=50
        )
        served = Served(engine, app, session, evals, zero_eval, explain, completions, info)
        served.apps.append(app)
        try:
            yield served
        finally:
            for each in served.apps:
                each.state.batcher.close()
            session.close()


def _client(app: Any, headers: dict[str, str] | None = AUTH) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://knnlm", headers=headers
    )


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _post_all(app: Any, path: str, bodies: list[Any]) -> list[httpx.Response]:
    async with _client(app) as client:
        return [await client.post(path, json=body) for body in bodies]


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def _close(a: Any, b: Any, path: str = "") -> None:
    """Equal JSON values, floats to 1e-5 relative (batches pad windows differently)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# --- answers equal the CLI's ----------------------------------------------------------------


def test_score_equals_eval(served: Served) -> None:
    responses = _run(_post_all(served.app, "/v1/score", [body for body, _ in SCORES]))
    for (body, _), response, cli_eval in zip(SCORES, responses, served.evals, strict=True):
        got = _ok(response)
        n = got["tokens_count"]
        assert n == cli_eval["tokens"]
        for key in ("tokens", "base_logprobs", "knn_logprobs", "lambdas", "searched"):
            assert len(got[key]) == n, key
        assert "".join(got["tokens"]) == body["text"]  # every predicted token, in order
        assert got["base_perplexity"] == pytest.approx(cli_eval["base_perplexity"], rel=1e-5)
        assert got["knn_perplexity"] == pytest.approx(cli_eval["knn_perplexity"], rel=1e-5)
        assert sum(not s for s in got["searched"]) / n == pytest.approx(cli_eval["skipped_share"])
        assert math.exp(-sum(got["knn_logprobs"]) / n) == pytest.approx(
            got["knn_perplexity"], rel=1e-5
        )
        assert got["note"] is None
        if "lambda" in body:  # a fixed lambda and no gate, as the flag means
            assert all(got["searched"])
            assert got["lambdas"] == [pytest.approx(body["lambda"])] * n
        old = [name for name in ("temperature", "top_k") if name in body]
        assert ("deprecation" in response.headers) == bool(old)
        for name in old:  # each older name is told, with the one to send instead
            assert f'"{name} is deprecated here: send knn_{name}"' in response.headers["warning"]
    assert _ok(responses[-1]) == _ok(responses[-2])  # the older names mean the same
    default, _, t_only = (_ok(r) for r in responses[:3])
    # the saved gate skips some positions, with the saved T or with T from the request
    assert 0 < sum(default["searched"]) < default["tokens_count"]
    assert t_only["searched"] == default["searched"]
    assert t_only["knn_perplexity"] != pytest.approx(default["knn_perplexity"], rel=1e-5)


def test_probability_zero_is_null_with_a_note(served: Served) -> None:
    assert served.zero_eval["knn_perplexity"] is None  # strict JSON: null for infinity
    (response,) = _run(_post_all(served.app, "/v1/score", [{"text": STRANGE, "lambda": 1}]))
    got = _ok(response)
    assert got["knn_perplexity"] is None
    assert "probability 0" in got["note"]
    assert None in got["knn_logprobs"]
    assert got["base_perplexity"] == pytest.approx(served.zero_eval["base_perplexity"], rel=1e-5)


def test_explain_equals_the_cli(served: Served) -> None:
    (response,) = _run(_post_all(served.app, "/v1/explain", [EXPLAIN]))
    got = _ok(response)
    assert len(got["tokens"]) == len(served.explain) > 0
    _close(got["tokens"], served.explain)
    assert any(row["neighbours"] for row in got["tokens"])


def test_score_per_token_equals_explain(served: Served) -> None:
    """Per token, /v1/score holds the numbers `knnlm explain` shows for the same text."""
    (response,) = _run(_post_all(served.app, "/v1/score", [{"text": EXPLAIN["text"]}]))
    got = _ok(response)
    rows = served.explain
    assert got["tokens"] == [row["token"] for row in rows]
    assert got["searched"] == [row["searched"] for row in rows]
    _close(got["lambdas"], [row["lmbda"] for row in rows])
    _close([math.exp(x) for x in got["base_logprobs"]], [row["lm_prob"] for row in rows])
    _close([math.exp(x) for x in got["knn_logprobs"]], [row["prob"] for row in rows])


def test_completions_equal_generate(served: Served) -> None:
    responses = _run(_post_all(served.app, "/v1/completions", [b for b, _ in COMPLETIONS]))
    for (body, _), response, expected in zip(
        COMPLETIONS, responses, served.completions, strict=True
    ):
        got = _ok(response)
        assert got["object"] == "text_completion"
        assert got["id"].startswith("cmpl-") and isinstance(got["created"], int)
        (choice,) = got["choices"]
        assert choice["text"] == expected
        assert choice["index"] == 0 and choice["logprobs"] is None
        usage = got["usage"]
        assert 0 < usage["completion_tokens"] <= body["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        finished = usage["completion_tokens"] == body["max_tokens"]
        assert choice["finish_reason"] == ("length" if finished else "stop")


def _events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def test_streaming_gives_the_same_text(served: Served) -> None:
    bodies = [{**body, "stream": True} for body, _ in COMPLETIONS]
    responses = _run(_post_all(served.app, "/v1/completions", bodies))
    for response, expected in zip(responses, served.completions, strict=True):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 2
        assert all(c["object"] == "text_completion" for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_collection_and_health(served: Served) -> None:
    async def go() -> list[httpx.Response]:
        async with _client(served.app, headers=None) as open_client:
            health = await open_client.get("/healthz")
            ready = await open_client.get("/readyz")
            heads = [await open_client.head(path) for path in ("/healthz", "/readyz")]
        async with _client(served.app) as client:
            summary = await client.get("/v1/collection")
            schema = await client.get("/openapi.json")
        return [health, ready, summary, schema, *heads]

    health, ready, summary, schema, *heads = _run(go())
    assert _ok(health) == {"status": "ok"}
    assert _ok(ready)["status"] == "ready"
    assert _ok(ready)["points"] == served.info["points"]
    assert [h.status_code for h in heads] == [200, 200]  # load balancers probe with HEAD
    assert all(h.content == b"" for h in heads)
    # what `knnlm info` says, less where the collection lives on the server's side
    assert _ok(summary) == {k: v for k, v in served.info.items() if k != "location"}
    assert "location" not in _ok(summary)
    paths = _ok(schema)["paths"]
    assert {"/v1/score", "/v1/completions", "/v1/explain", "/v1/collection"} <= set(paths)


# --- refusals ---------------------------------------------------------------------------------

LONG = "for i in range(10):\n" * 40  # past max_text_tokens
BAD: list[tuple[str, Any, int, str]] = [
    ("/v1/score", b'{"text": "abc"', 400, "not valid JSON"),
    ("/v1/score", b"[1, 2]", 400, "JSON object"),
    ("/v1/score", b"", 400, "JSON object"),
    ("/v1/score", {}, 400, "text: Field required"),
    ("/v1/score", {"text": 5}, 400, "text: Input should be a valid string"),
    ("/v1/score", {"text": ""}, 400, "text: is empty"),
    ("/v1/score", {"text": " \n\t"}, 400, "text: is empty"),
    ("/v1/score", {"text": "x", "lambda": 1.5}, 400, "lambda:"),
    ("/v1/score", {"text": "x", "lambda": "0.5"}, 400, "lambda:"),
    ("/v1/score", {"text": "x", "temperature": 0}, 400, "temperature:"),
    ("/v1/score", {"text": "x", "top_k": 0}, 400, "top_k:"),
    ("/v1/score", {"text": "x", "top_k": 16_385}, 400, "top_k:"),
    ("/v1/score", {"text": "x", "top_k": 2.5}, 400, "top_k:"),
    ("/v1/score", {"text": "x", "k": 3}, 400, "k: unknown parameter"),
    ("/v1/score", {"text": "x", "knn_temperature": 0}, 400, "knn_temperature:"),
    ("/v1/score", {"text": "x", "knn_top_k": 0}, 400, "knn_top_k:"),
    (
        "/v1/score",
        {"text": "x", "top_k": 3, "knn_top_k": 4},
        400,
        "top_k: the older name of knn_top_k; send knn_top_k alone",
    ),
    ("/v1/score", {"text": LONG}, 413, "text:"),
    ("/v1/score", {"text": "x" * 30_000}, 413, "20,000 bytes"),
    ("/v1/explain", {"text": "x", "top": 0}, 400, "top:"),
    ("/v1/explain", {"text": "x", "neighbours": -1}, 400, "neighbours:"),
    ("/v1/explain", {"text": ""}, 400, "text: is empty"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt: Field required"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens:"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, "max_tokens: at most 64"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature:"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p:"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p:"),
    ("/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, 400, "seed:"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed:"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream:"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty: is not"),
    ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "GET /v1/models"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "template"),
    ("/v1/score", b'{"text": "ab\\ud800cd"}', 400, "text: holds a lone surrogate"),
    ("/v1/score", b'{"text": "x", "k\\ud800": 1}', 400, "a field name holds a lone surrogate"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 2}, 413, "prompt:"),
]


def test_bad_requests_get_one_line_errors(served: Served) -> None:
    async def go() -> list[httpx.Response]:
        async with _client(served.app) as client:
            out = []
            for path, body, _, _ in BAD:
                if isinstance(body, bytes):
                    headers = {"content-type": "application/json"}
                    out.append(await client.post(path, content=body, headers=headers))
                else:
                    out.append(await client.post(path, json=body))
            # a prompt within the token limit that leaves too little context for max_tokens
            prompt = next(
                p
                for p in ("x " * n for n in range(1, 120))
                if 128 - 64 < len(served.session.lm.encode(p)) <= LIMITS["max_text_tokens"]
            )
            out.append(
                await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 64})
            )
            out.append(await client.get("/v1/nowhere"))
            out.append(await client.get("/v1/score"))
            return out

    responses = _run(go())
    expected = [(status, fragment) for _, _, status, fragment in BAD]
    expected += [(400, "model's context")]
    expected += [(404, "Not Found"), (405, "Method Not Allowed")]
    for (status, fragment), response in zip(expected, responses, strict=True):
        assert response.status_code == status, (fragment, response.text)
        body = response.json()
        assert list(body) == ["error"], body  # OpenAI's error body
        assert list(body["error"]) == ["message", "type", "param", "code"], body
        message = body["error"]["message"]
        assert fragment in message, (fragment, body)
        assert "\n" not in message and "Traceback" not in response.text


def test_a_closed_batcher_is_unavailable(served: Served) -> None:
    from knnlm.service.app import create_app

    app = create_app(served.session)
    served.apps.append(app)
    app.state.batcher.close()

    async def go() -> list[httpx.Response]:
        async with _client(app) as client:
            return [await client.get("/readyz"), await client.post("/v1/score", json={"text": "x"})]

    for response in _run(go()):
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "not running" in message or "shutting down" in message


def test_the_default_max_tokens_yields_to_a_lower_server_limit(served: Served) -> None:
    """OpenAI's default of 16 new tokens, left out by the client, is capped at the server's
    limit; asked for explicitly, more than the limit is refused by name."""
    from knnlm.service.app import Limits, create_app

    app = create_app(served.session, limits=Limits(max_completion_tokens=4))
    served.apps.append(app)
    body = {"prompt": PROMPT, "temperature": 0}
    left_out, asked = _run(_post_all(app, "/v1/completions", [body, {**body, "max_tokens": 16}]))
    got = _ok(left_out)
    assert 1 <= got["usage"]["completion_tokens"] <= 4
    assert asked.status_code == 400
    assert asked.json()["error"]["param"] == "max_tokens"


def test_an_empty_api_key_is_refused(served: Served) -> None:
    from knn_store.errors import ConfigError
    from knnlm.service.app import create_app

    with pytest.raises(ConfigError, match="empty"):
        create_app(served.session, api_key=" ")


def test_the_api_key_guards_and_is_never_shown(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = {"text": PROSE}

    async def go() -> dict[str, httpx.Response]:
        async with _client(served.app, headers=None) as client:
            post = client.post
            return {
                "missing": await post("/v1/score", json=body),
                "wrong": await post("/v1/score", json=body, headers={"Authorization": "Bearer x"}),
                "prefix": await post(
                    "/v1/score", json=body, headers={"Authorization": f"Bearer {SECRET[:-1]}"}
                ),
                "basic": await post(
                    "/v1/score", json=body, headers={"Authorization": f"Basic {SECRET}"}
                ),
                "schema": await client.get("/openapi.json"),
                "collection": await client.get("/v1/collection"),
                "right": await post("/v1/score", json=body, headers=AUTH),
                "lowercase": await post(
                    "/v1/score", json=body, headers={"authorization": f"bearer {SECRET}"}
                ),
                "health": await client.get("/healthz"),
                "ready": await client.get("/readyz"),
                "info": await client.get("/v1/collection", headers=AUTH),
                "error": await post("/v1/score", json={"text": ""}, headers=AUTH),
            }

    responses = _run(go())
    for name in ("missing", "wrong", "prefix", "basic", "schema", "collection"):
        assert responses[name].status_code == 401, name
        error = responses[name].json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert responses[name].headers["www-authenticate"] == "Bearer"
    assert "missing API key" in responses["missing"].json()["error"]["message"]
    assert responses["wrong"].json()["error"]["message"] == "wrong API key"
    for name in ("right", "lowercase", "health", "ready", "info"):
        assert responses[name].status_code == 200, name
    for response in responses.values():
        assert SECRET not in response.text
        assert SECRET not in str(response.headers)
    assert SECRET not in caplog.text


# --- batching -------------------------------------------------------------------------------


def test_concurrent_requests_share_batches_and_answer_as_alone(served: Served) -> None:
    texts = [CODE, PROSE, STRANGE, "def mul(a, b):\n    return a"]
    scores = [
        ("/v1/score", {"text": texts[i % 4], **[{}, {"lambda": 0.5}, {"top_k": 4}][i % 3]})
        for i in range(8)
    ]
    completions = [
        ("/v1/completions", {"prompt": p, "max_tokens": 4 + i, "temperature": t, "seed": i})
        for i, (p, t) in enumerate([(PROMPT, 0.0), ("for", 1.0), ("x", 0.7), (PROSE, 1.3)])
    ]
    explains = [("/v1/explain", {"text": t, "top": 2, "neighbours": 1}) for t in texts[:2]]
    requests = [*scores, *completions, *explains]

    async def one_by_one() -> list[Any]:
        async with _client(served.app) as client:
            return [_ok(await client.post(path, json=body)) for path, body in requests]

    async def together() -> list[Any]:
        async with _client(served.app) as client:
            sent = [client.post(path, json=body) for path, body in requests]
            return [_ok(r) for r in await asyncio.gather(*sent)]

    stats = served.app.state.batcher.stats
    start = stats.to_dict()
    alone = _run(one_by_one())
    middle = stats.to_dict()
    both = _run(together())
    end = stats.to_dict()
    assert end["requests"] - middle["requests"] == len(requests)
    assert middle["batches"] - start["batches"] == len(requests)
    assert end["batches"] - middle["batches"] < len(requests)
    assert end["lm_forwards"] - middle["lm_forwards"] < middle["lm_forwards"] - start["lm_forwards"]
    assert end["largest_batch"] > 1
    for (path, _), single, batched in zip(requests, alone, both, strict=True):
        if path == "/v1/completions":
            assert batched["choices"][0]["text"] == single["choices"][0]["text"]
            assert batched["usage"] == single["usage"]
        else:
            _close(batched, single)


# --- a real server --------------------------------------------------------------------------


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_uvicorn_serves_streams_and_shuts_down(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    from knnlm.service.app import create_app

    caplog.set_level(logging.INFO)
    app = create_app(served.session, api_key=SECRET)
    served.apps.append(app)
    with (
        UvicornThread(app, log_level="info") as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        assert client.get("/readyz").json()["status"] == "ready"
        score = client.post("/v1/score", json=SCORES[0][0]).json()
        assert score["base_perplexity"] == pytest.approx(
            served.evals[0]["base_perplexity"], rel=1e-5
        )
        body, _ = COMPLETIONS[1]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == served.completions[1]
        refused = client.post("/v1/score", json={"text": "x"}, headers={"Authorization": ""})
        assert refused.status_code == 401
    assert not app.state.batcher.healthy  # the lifespan closed it
    assert "POST /v1/score" in caplog.text  # the access log ran, and it holds no key
    assert SECRET not in caplog.text


def test_knnlm_serve_runs_and_stops_on_sigterm(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command in its own process, on its own small collection."""
    for name in list(os.environ):
        if name.upper().startswith("KNNLM_"):
            monkeypatch.delenv(name)
    root = tmp_path
    write(root / "corpus" / "a.txt", CORPUS_LINES[0] * 3)
    cache = root / "cache"
    flags = ["--model", str(tiny_models["gpt2"]), "--window", "16", "--stride", "8"]
    flags += ["--backend", "local"]
    flags += ["--data-dir", str(root / "data"), "--collection", "proc"]
    _cli(["ingest", str(root / "corpus"), *flags, "-q", "--json"], cache)
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ)
    env.update(KNNLM_MODEL_CACHE=str(cache), KNNLM_SERVE_API_KEY=SECRET, KNNLM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "knnlm", "serve", *flags, "--port", str(port), "--top-k", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while True:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            got = client.post("/v1/score", json={"text": PROSE}, headers=AUTH)
            assert got.status_code == 200 and got.json()["tokens_count"] > 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "server stopped" in err
    assert "Traceback" not in err
    assert SECRET not in out + err
