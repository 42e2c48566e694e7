"""The page at ``GET /``, driven in headless Chromium against a real server.

One tiny-model collection (with a saved policy whose retrieval gate skips part of CODE) is
served by uvicorn on a loopback port, with an API key. The browser types the key, explains
a text, clicks a token and streams two completions; every number the page shows is checked
against the API's own answer to the same request, and every request the browser made must
have gone to the server's origin. The browser tests need Debian's ``chromium`` and
``chromedriver`` (the ``selenium`` package is a declared test dependency); without them they
are skipped, saying which is missing. Set ``KNNLM_PAGE_SCREENSHOT=<file.png>`` to keep the
screenshot taken of a real explanation (the test always takes one).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serving import UvicornThread, clean_environment, tiny_collection
from tests.test_service import AUTH, CODE, SECRET, _save_a_policy

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PROMPT = "def add(a, b):\n   "
WHITE = (247, 247, 247)  # the colour of an unchanged probability
# read at import: the tests themselves run with every KNNLM_* variable removed
SCREENSHOT = os.environ.get("KNNLM_PAGE_SCREENSHOT")


@dataclass
class Server:
    base: str  # http://127.0.0.1:<port>
    api: httpx.Client  # with the key


@pytest.fixture(scope="module")
def server(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``create_app`` under uvicorn in a thread, on a collection of the tiny GPT-2."""

    from knn_store import open_session
    from knnlm.service.app import create_app

    root = tmp_path_factory.mktemp("page")
    with clean_environment():
        made = tiny_collection(
            root, tiny_models["gpt2"], collection="page", ingest=("--domain", "code")
        )
        settings = made.settings
        _save_a_policy(settings)
        session = open_session(settings)
    app = create_app(session, api_key=SECRET, batch_wait_ms=20)
    try:
        with (
            UvicornThread(app) as served,
            httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as api,
        ):
            yield Server(served.url, api)
    finally:
        app.state.batcher.close()
        session.close()


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for need in (CHROMIUM, CHROMEDRIVER):
        if not need.exists():
            return f"{need} is missing: apt-get install chromium chromium-driver"
    return None


@pytest.fixture(scope="module")
def browser(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium with its network log on, the page loaded."""
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--window-size=1400,1000",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # Chromium's own traffic (updates, sync, metrics) stays off: only the page talks
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root otherwise
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(60)
        driver.get_log("performance")  # drop Chromium's own start page: not the page's doing
        driver.get(server.base + "/")
        yield driver
    finally:
        driver.quit()


# --- helpers --------------------------------------------------------------------------------


def _wait(driver: Any, condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` and the page's error line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    error = driver.execute_script("return document.getElementById('error').textContent")
    raise AssertionError(f"timed out waiting for {what}; the page's error line: {error!r}")


def _set(driver: Any, element_id: str, value: str) -> None:
    """Type ``value`` into a field as a user would (its input events fire)."""
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _error_line(driver: Any) -> str | None:
    return driver.execute_script(
        "const e = document.getElementById('error'); return e.hidden ? null : e.textContent"
    )


def _spans(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#tokens .tok')].map(s => ({...s.dataset,"
        " cls: s.className, bg: getComputedStyle(s).backgroundColor}))"
    )


def _rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in css.removeprefix("rgb(").removesuffix(")").split(",")[:3])
    return r, g, b


def _explain(driver: Any, text: str, neighbours: int, top: int) -> None:
    # empty the token box first, so the wait below sees this explanation's tokens
    driver.execute_script("document.getElementById('tokens').replaceChildren()")
    _set(driver, "text", text)
    _set(driver, "neighbours-count", str(neighbours))
    _set(driver, "top-count", str(top))
    driver.find_element("id", "explain").click()
    _wait(
        driver,
        lambda: driver.execute_script("return document.querySelector('#tokens .tok') !== null"),
        "the explained tokens",
    )


def _origins_only(driver: Any, base: str) -> None:
    """Every request the page made, by the page's own count (resource timing) and by the
    browser's network log, went to ``base``; no URL carried the key."""
    entries = driver.execute_script(
        "return performance.getEntriesByType('navigation').concat("
        "performance.getEntriesByType('resource')).map(e => e.name)"
    )
    sent = [
        message["message"]
        for message in (_json(entry["message"]) for entry in driver.get_log("performance"))
        if message["message"]["method"] == "Network.requestWillBeSent"
    ]
    urls = [*entries, *(m["params"]["request"]["url"] for m in sent)]
    assert any(url.startswith(base + "/v1/") for url in urls)  # the log saw the API calls
    for url in urls:
        if urlsplit(url).scheme in ("data", "about", "chrome"):
            continue  # no network: the empty favicon, Chromium's own pages
        assert url.startswith(base + "/"), url
        assert SECRET not in url
    assert SECRET not in driver.current_url


def _json(text: str) -> Any:
    import json

    return json.loads(text)


# --- without a browser ----------------------------------------------------------------------


def test_the_page_loads_without_the_key_and_the_api_still_wants_it(server: Server) -> None:
    page = httpx.get(server.base + "/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "'unsafe-inline'" not in policy  # the inline script and style go by their hashes
    assert "/v1/explain" in page.text
    for outside in ("http://", "https://", "//cdn", "@import", "url("):
        assert outside not in page.text, outside  # nothing it could fetch from elsewhere
    assert "/" not in server.api.get("/openapi.json").json()["paths"]  # not part of the API
    refused = httpx.post(server.base + "/v1/explain", json={"text": "x"}, timeout=30)
    assert refused.status_code == 401


# --- in the browser -------------------------------------------------------------------------


def test_explain_colours_each_token_and_shows_its_neighbours(
    server: Server, browser: Any, tmp_path: Path
) -> None:
    text = CODE
    api = server.api.post("/v1/explain", json={"text": text, "top": 3, "neighbours": 4})
    assert api.status_code == 200, api.text
    rows = api.json()["tokens"]
    _set(browser, "key", SECRET)
    _explain(browser, text, neighbours=4, top=3)
    assert _error_line(browser) is None

    spans = _spans(browser)
    assert len(spans) == len(rows)
    assert any(not r["searched"] for r in rows) and any(r["searched"] for r in rows)
    distance = []
    for span, row in zip(spans, rows, strict=True):
        assert float(span["lambda"]) == pytest.approx(row["lmbda"], rel=1e-9, abs=1e-12)
        assert span["searched"] == str(row["searched"]).lower()
        assert ("skipped" in span["cls"].split()) == (not row["searched"])
        shift = math.log(row["prob"]) - math.log(row["lm_prob"])
        assert float(span["shift"]) == pytest.approx(shift, rel=1e-6, abs=1e-9)
        rgb = _rgb(span["bg"])
        if not row["searched"]:
            assert rgb == WHITE  # lambda 0: the datastore changed nothing
        elif shift > 1e-3:
            assert rgb[2] > rgb[0]  # raised: blue
        elif shift < -1e-3:
            assert rgb[0] > rgb[2]  # lowered: red
        distance.append((abs(shift), sum(abs(c - w) for c, w in zip(rgb, WHITE, strict=True))))
    # the further the datastore moved a token, the further its colour from white
    distance.sort()
    assert all(a[1] <= b[1] + 1 for a, b in pairwise(distance))
    assert distance[-1][1] > distance[0][1]

    # click the token the datastore moved most: its panel lists the API's neighbours
    searched = [i for i, r in enumerate(rows) if r["searched"] and r["neighbours"]]
    i = max(searched, key=lambda j: abs(float(spans[j]["shift"])))
    browser.find_elements("css selector", "#tokens .tok")[i].click()
    shown = _wait(
        browser,
        lambda: browser.execute_script(
            "return [...document.querySelectorAll('#neighbours tr.neighbour')].map(tr => ({"
            "domain: tr.querySelector('.domain').textContent,"
            "source: tr.querySelector('.source').textContent,"
            "offset: tr.querySelector('.offset').textContent,"
            "context: tr.querySelector('.context').textContent,"
            "value: tr.querySelector('.value').textContent}))"
        ),
        "the neighbour panel",
    )
    expected = rows[i]["neighbours"]
    assert len(shown) == len(expected) == 4
    for got, want in zip(shown, expected, strict=True):
        assert got["domain"] == want["domain"] == "code"
        assert got["source"] == want["source"] and Path(want["source"]).name.startswith("doc")
        assert got["offset"] == str(want["offset"])
        assert got["context"] == want["context"] and want["context"]
        assert got["value"] == want["token"]
    tops = browser.execute_script(
        "return ['lm-top', 'knn-top'].map(c => document.querySelectorAll('tbody.' + c + ' tr')"
        ".length)"
    )
    assert tops == [len(rows[i]["lm_top"]), len(rows[i]["knn_top"])]

    # lambda under each token, on request
    browser.find_element("id", "show-lambda").click()
    label = browser.execute_script(
        "return getComputedStyle(document.querySelector('#tokens .tok.searched'), '::after')"
        ".content"
    )
    assert label.strip('"') == f"{rows[[r['searched'] for r in rows].index(True)]['lmbda']:.2f}"

    shot = Path(SCREENSHOT or tmp_path / "page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    # the policy let the inline script and style run, and nothing else failed
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems
    _origins_only(browser, server.base)


def test_completions_stream_side_by_side_as_the_api_answers(server: Server, browser: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "seed": 1}
    knn = server.api.post("/v1/completions", json=body)
    assert knn.status_code == 200, knn.text
    _set(browser, "key", SECRET)
    _set(browser, "prompt", PROMPT)
    _set(browser, "max-tokens", "12")
    _set(browser, "temperature", "0")
    _set(browser, "seed", "1")
    browser.find_element("id", "complete").click()
    _wait(
        browser,
        lambda: browser.execute_script(
            "return ['out-knn', 'out-base'].every(id => document.getElementById(id).dataset.done)"
        ),
        "both completions",
    )
    texts = browser.execute_script(
        "return ['out-knn', 'out-base'].map(id => document.getElementById(id).dataset.text ?? null)"
    )
    assert texts[0] == knn.json()["choices"][0]["text"]
    assert texts[0]  # the tiny model says something
    _origins_only(browser, server.base)
    schema = server.api.get("/openapi.json").json()["components"]["schemas"]
    # the base LM's column needs it: a schema without it is a broken page, not a skip
    assert "knn" in schema["CompletionRequest"]["properties"]
    base = server.api.post("/v1/completions", json={**body, "knn": False})
    assert base.status_code == 200, base.text
    assert _error_line(browser) is None
    assert texts[1] == base.json()["choices"][0]["text"]


def test_a_wrong_key_shows_one_error_line(server: Server, browser: Any) -> None:
    _set(browser, "key", "not-the-key")
    browser.find_element("id", "explain").click()
    line = _wait(browser, lambda: _error_line(browser), "the error line")
    assert line.startswith("401: ") and "API key" in line, line
    assert "not-the-key" not in browser.current_url
    _set(browser, "key", SECRET)
    _explain(browser, "def mul(a, b):", neighbours=1, top=1)
    assert _error_line(browser) is None  # the next good call clears it
