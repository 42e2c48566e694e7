"""``knnlm serve`` fuzzed from its own OpenAPI document, in-process, with a tiny model.

Schemathesis reads ``/openapi.json`` and sends every operation bodies that fit the schema and
bodies that break it (wrong types, missing fields, out-of-range numbers), seeded so that CI
sees the same cases every run. Whatever it sends, the answer must not be a 5xx, its status
must be one the document lists for the operation, and its body must match the documented
schema: a client generated from the spec then never meets an answer it cannot parse.

Schemathesis keeps to what JSON Schema can describe, so a few hostile bodies it does not make
are sent by hand: lone surrogates, invalid UTF-8, a ``curl -d`` form-encoded JSON body,
numbers past float range, NaN, deep nesting.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.serving import clean_environment, tiny_collection

SECRET = "fuzz-key-0c4e7a21"
AUTH = {"Authorization": f"Bearer {SECRET}"}
# operations a positive case must get a 200 from (chat needs a chat template; the tiny one
# has none)
SERVED_BY_ANY_MODEL = {"POST /v1/score", "POST /v1/completions", "POST /v1/explain"}
# Per operation and mode; about 10 operations at a few ms a case keep the module near a minute
# on two cores. Raise it locally (KNNLM_FUZZ_EXAMPLES=500) for a deeper search.
MAX_EXAMPLES = int(os.environ.get("KNNLM_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_session(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A session on a tiny collection, shared by the module's apps."""
    from knn_store import open_session

    root = tmp_path_factory.mktemp("serve-fuzz")
    with clean_environment():
        settings = tiny_collection(root, tiny_models["gpt2"], collection="fuzz").settings
        with open_session(settings) as session:
            yield session


@pytest.fixture
def fuzz_app(fuzz_session: Any) -> Iterator[Any]:
    """A fresh app for each test, with small limits so that the longest texts and
    completions schemathesis can ask for stay cheap. Fresh, because schemathesis ends an
    app's lifespan after each test, which closes its batcher for good."""
    from knnlm.service.app import Limits, create_app

    limits = Limits(max_body_bytes=20_000, max_text_tokens=120, max_completion_tokens=16)
    app = create_app(fuzz_session, api_key=SECRET, limits=limits, max_batch=8, batch_wait_ms=1)
    try:
        yield app
    finally:
        app.state.batcher.close()


@pytest.fixture
def api_schema(fuzz_app: Any) -> Any:
    """The app's own document, read through the app, as a client would read it."""
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers=AUTH)


def _checks() -> list[Any]:
    from schemathesis import checks

    return [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
    ]


# schemathesis's own pytest plugin (`schema.parametrize()` on a fixture) needs a pytest
# internal that pytest 9 removed, so each operation gets its own Hypothesis test here. No
# shrinking: a failure is reported as sent (schemathesis prints the curl line), in bounded time.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_answer_is_documented_and_none_is_a_server_error(api_schema: Any, mode: str) -> None:
    from hypothesis import Phase, given
    from hypothesis.errors import Unsatisfiable

    failures = []
    answered: dict[str, Counter[int]] = {}  # statuses per operation, to see the fuzz bite
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"POST /v1/score", "POST /v1/completions"} <= {op.label for op in operations}
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=AUTH, checks=_checks())
            answered.setdefault(case.operation.label, Counter())[response.status_code] += 1

        try:
            check()
        except Unsatisfiable:  # no parameters, or none that can be made invalid: no negative case
            assert mode == "negative", operation.label
        except Exception as exc:  # every operation's failure, not just the first
            failures.append(f"{operation.label} ({mode}): {exc}")
    assert not failures, "\n\n".join(failures)
    # not a vacuous pass: valid requests were served, invalid ones refused by the route
    posts = [label for label in answered if label.startswith("POST /v1/")]
    assert posts, answered
    for label in posts:
        statuses = answered[label]
        if mode == "positive" and label in SERVED_BY_ANY_MODEL:  # chat needs a template
            assert statuses[200] > 0, (label, statuses)
        else:
            assert sum(n for status, n in statuses.items() if 400 <= status < 500), statuses
        assert statuses[503] == 0, (label, statuses)


# --- hostile bodies schemathesis does not make --------------------------------------------

JSON = {"content-type": "application/json"}
DEEP = 5_000  # levels of nesting: past Python's recursion limit for a naive walk
HOSTILE: list[tuple[str, bytes, dict[str, str]]] = [
    # lone surrogates: valid JSON escapes that no UTF-8 encoder takes
    ("/v1/score", b'{"text": "ab\\ud800cd"}', JSON),
    ("/v1/score", b'{"text": "\\udfff"}', JSON),
    ("/v1/explain", b'{"text": "x\\udc80y", "top": 1, "neighbours": 1}', JSON),
    ("/v1/completions", b'{"prompt": "ab\\ud800cd", "max_tokens": 2}', JSON),
    # bytes that are not UTF-8
    ("/v1/score", b'{"text": "ab\xff\xfecd"}', JSON),
    ("/v1/completions", b'{"prompt": "\xc3", "max_tokens": 2}', JSON),
    # what `curl -d` sends: JSON under a form content type
    ("/v1/score", b'{"text": "def add(a, b):"}', {}),
    (
        "/v1/completions",
        b'{"prompt": "def", "max_tokens": 2, "seed": 1}',
        {"content-type": "application/x-www-form-urlencoded"},
    ),
    ("/v1/score", b"text=abc", {"content-type": "application/x-www-form-urlencoded"}),
    ("/v1/score", b'{"text": "abc"}', {"content-type": "text/plain"}),
    # numbers past float64, NaN and infinities (Python's json reads them; strict JSON does not)
    ("/v1/score", b'{"text": "x", "top_k": 1e400}', JSON),
    ("/v1/score", b'{"text": "x", "lambda": NaN}', JSON),
    ("/v1/score", b'{"text": "x", "temperature": Infinity}', JSON),
    ("/v1/score", b'{"text": "x", "temperature": 1e-400}', JSON),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}", JSON),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "seed": 1' + b"0" * 40 + b"}", JSON),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "temperature": 1e-320}', JSON),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "top_p": 5e-324}', JSON),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "temperature": -0.0}', JSON),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -Infinity}', JSON),
    # nesting and shapes no field takes
    ("/v1/score", b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}", JSON),
    ("/v1/score", b'{"text": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}", JSON),
    ("/v1/completions", b'{"prompt": [[[1, [2]], {"x": null}]], "max_tokens": 2}', JSON),
    ("/v1/completions", b'{"prompt": [1e400, -1, 99999999999], "max_tokens": 2}', JSON),
    ("/v1/score", b'{"text": "a", "text": {"again": true}}', JSON),
    ("/v1/score", b"null", JSON),
    ("/v1/score", b'"just a string"', JSON),
    ("/v1/score", b"\x00\x01\x02", JSON),
    ("/v1/score", b'\xef\xbb\xbf{"text": "bom first"}', JSON),
    ("/v1/explain", b'{"text": "x", "top": 1e30, "neighbours": 1e30}', JSON),
    ("/v1/explain", b'{"text": "x", "neighbours": 4294967297}', JSON),
]


def _documented(document: dict[str, Any], path: str, status: int) -> bool:
    responses = document["paths"].get(path, {}).get("post", {}).get("responses", {})
    return str(status) in responses or f"{str(status)[0]}XX" in responses or "default" in responses


def _error_message(body: Any) -> str:
    """The message of either error shape the service has had: OpenAI's
    ``{"error": {"message": ...}}``, or the older ``{"error": "..."}``."""
    assert isinstance(body, dict) and "error" in body, body
    error = body["error"]
    message = error.get("message") if isinstance(error, dict) else error
    assert isinstance(message, str) and message, body
    return message


def test_hostile_bodies_get_documented_answers_and_no_server_error(fuzz_app: Any) -> None:
    async def go() -> tuple[dict[str, Any], list[httpx.Response]]:
        transport = httpx.ASGITransport(fuzz_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://knnlm", headers=AUTH
        ) as client:
            document = (await client.get("/openapi.json")).json()
            out = []
            for path, body, headers in HOSTILE:
                out.append(await client.post(path, content=body, headers=headers))
            return document, out

    document, responses = asyncio.run(go())
    problems = []
    for (path, body, headers), response in zip(HOSTILE, responses, strict=True):
        sent = f"POST {path} {headers} {body[:80]!r}"
        got = f"{response.status_code} {response.text[:200]}"
        if response.status_code >= 500 or not _documented(document, path, response.status_code):
            problems.append(f"{sent} -> {got}")
            continue
        if response.status_code >= 400:
            message = _error_message(response.json())
            if "\n" in message or "Traceback" in response.text:
                problems.append(f"{sent} -> {got} (not one line)")
        else:  # accepted: the body must be a real answer, JSON or events
            kind = response.headers["content-type"]
            assert kind.startswith(("application/json", "text/event-stream")), (sent, kind)
            if kind.startswith("application/json"):
                assert "error" not in response.json(), (sent, got)
    assert not problems, "\n".join(problems)


def test_lone_surrogates_never_reach_the_tokenizer_as_text(fuzz_app: Any) -> None:
    """D4: a lone surrogate is the client's mistake, so a 4xx that names the field, never a
    500 from the tokenizer; the same text without it is scored."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(fuzz_app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://knnlm", headers=AUTH
        ) as client:
            bad = await client.post("/v1/score", content=b'{"text": "ab\\ud800cd"}', headers=JSON)
            good = await client.post("/v1/score", content=json.dumps({"text": "abcd"}))
            return [bad, good]

    bad, good = asyncio.run(go())
    assert 400 <= bad.status_code < 500, bad.text
    assert "text" in _error_message(bad.json())
    assert good.status_code == 200, good.text
