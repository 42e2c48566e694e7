"""Load test of `knnlm serve`: latency at 1, 8 and 64 concurrent clients, then a hostile mix
and a SIGTERM under load, with every answer to a good request checked.

What counts as right:

- a /v1/score must give `knnlm eval --json`'s token count and perplexities for the same text
  (to ``--rtol``; the references are computed first, since the embedded store admits one
  process at a time);
- a completion (greedy, or sampled with a fixed seed) must equal the answer the same server
  gave to the same request sent alone, before any load.

The hostile level (``--hostile-clients``) mixes ``--bad-share`` malformed, over-limit and
wrongly typed requests, and ``--disconnect-share`` streamed completions whose client leaves
after a few events, into the good ones: the good ones must still be answered right, and no
bad one may get a 5xx. Last, ``--sigterm-requests`` good requests are sent, and once the
first is answered the server gets SIGTERM: each must then be answered right or refused with
503, never wrongly, and the process must exit (within ``--shutdown-timeout`` when the server
has that flag).

``--pythonpath`` runs another checkout's code (both the references and the server), so one
collection can be measured before and after a change; each run writes ``<out>/<label>.json``,
and ``--report`` draws the table (``results.md``) and the plot from all of them. The settings
reach `knnlm eval` and `knnlm serve` as ``KNNLM_*`` variables, which both inherit, and as
flags after ``--``, given to both. Exits 1 on any failure of a good request or wrong answer.
Nothing here asserts on time.

    KNNLM_COLLECTION=kernel-docs python benchmarks/service_load.py held-out/ --glob '*.rst'
    python benchmarks/service_load.py test/ --label before --pythonpath /tmp/knnlm-before
    python benchmarks/service_load.py --report --out benchmarks/results/service_load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.paths import relative

# Windows pad to the same width in any batch, so the keys and neighbours are the same; a
# float32 reduction split differently across threads may still move a token's score in its
# last bit (seen: 1e-9 relative in a perplexity). A lambda bucket flipped costs 4e-4.
RTOL = 1e-6
GOOD_KINDS = ("score", "greedy", "seeded")
PROMPT_CHARS = 200


@dataclass
class Level:
    """What one level's good requests got, and how its hostile ones were answered."""

    name: str
    clients: int
    requests: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0  # good requests not answered 200 (or, at SIGTERM, not 503)
    wrong: int = 0  # answered 200 with another answer than the reference
    problems: list[str] = field(default_factory=list)  # the first few, for the report
    bad: Counter[str] = field(default_factory=Counter)  # answer to each bad request kind
    bad_5xx: int = 0
    disconnects: int = 0
    disconnect_problems: int = 0  # a stream that failed before its client left
    streams: Counter[str] = field(default_factory=Counter)  # how each left stream went
    refused_503: int = 0  # at SIGTERM: good requests refused cleanly
    server: dict[str, int] = field(default_factory=dict)  # the batcher's counts in the level

    def fail(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 8:
            self.problems.append(what)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clients": self.clients,
            "requests": self.requests,
            "good_answered": len(self.latencies_ms),
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests / self.seconds, 2) if self.seconds else 0,
            "p50_ms": round(self.percentile(0.5), 1),
            "p99_ms": round(self.percentile(0.99), 1),
            "errors": self.errors,
            "wrong": self.wrong,
            "problems": self.problems,
            "bad": dict(sorted(self.bad.items())),
            "bad_5xx": self.bad_5xx,
            "disconnects": self.disconnects,
            "disconnect_problems": self.disconnect_problems,
            "streams": dict(sorted(self.streams.items())),
            "refused_503": self.refused_503,
            "server": self.server,
        }


# --- requests --------------------------------------------------------------------------------


def good_request(kind: str, i: int, texts: list[str], max_tokens: int) -> tuple[str, Any]:
    """The path and body of a good request on text ``i``."""
    if kind == "score":
        return "/v1/score", {"text": texts[i]}
    body: dict[str, Any] = {"prompt": texts[i][:PROMPT_CHARS], "max_tokens": max_tokens}
    if kind == "greedy":
        body["temperature"] = 0
    else:  # sampled, so batched rows must keep their own generators
        body.update(temperature=0.8, top_p=0.95, seed=1000 + i)
    return "/v1/completions", body


def bad_requests(limits: dict[str, int]) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, path, body, headers) of requests a server must refuse (or, for the tiny
    temperature and top_p, may answer), never with a 5xx."""
    as_json = {"content-type": "application/json"}

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    over_tokens = "word " * (2 * limits["max_text_tokens"])
    return [
        ("malformed JSON", "/v1/score", b'{"text": "abc"', as_json),
        ("array body", "/v1/score", b"[1, 2]", as_json),
        ("text of a wrong type", "/v1/score", body({"text": 5}), as_json),
        ("nested junk", "/v1/score", body({"text": {"a": [[[None, {}]]]}}), as_json),
        (
            "max_tokens of a wrong type",
            "/v1/completions",
            body({"prompt": "x", "max_tokens": "ten"}),
            as_json,
        ),
        (
            "max_tokens over the limit",
            "/v1/completions",
            body({"prompt": "x", "max_tokens": limits["max_completion_tokens"] + 1}),
            as_json,
        ),
        ("text over the token limit", "/v1/score", body({"text": over_tokens}), as_json),
        (
            "body over the byte limit",
            "/v1/score",
            body({"text": "a" * (limits["max_body_bytes"] + 1)}),
            as_json,
        ),
        ("knn_top_k out of range", "/v1/score", body({"text": "x", "knn_top_k": -1}), as_json),
        ("lone surrogate", "/v1/score", b'{"text": "ab\\ud800cd"}', as_json),
        (
            "temperature 1e-40",
            "/v1/completions",
            body({"prompt": "The", "max_tokens": 4, "temperature": 1e-40}),
            as_json,
        ),
        (
            "top_p 1e-46",
            "/v1/completions",
            body({"prompt": "The", "max_tokens": 4, "top_p": 1e-46, "seed": 3}),
            as_json,
        ),
    ]


def mismatch(got: dict[str, Any], want: dict[str, Any], rtol: float) -> str | None:
    """How /v1/score's answer differs from eval's, or None."""
    if got["tokens_count"] != want["tokens"]:
        return f"{got['tokens_count']} tokens, eval {want['tokens']}"
    for key in ("base_perplexity", "knn_perplexity"):
        mine, theirs = got[key], want[key]
        if mine is None and theirs is None:  # both infinite (JSON null)
            continue
        if mine is None or theirs is None or not math.isclose(mine, theirs, rel_tol=rtol):
            return f"{key} {mine}, eval {theirs}"
    return None


@dataclass
class Checker:
    """The references every good answer is compared with."""

    texts: list[str]
    evals: list[dict[str, Any]]
    max_tokens: int
    rtol: float
    solo: dict[tuple[str, int], str] = field(default_factory=dict)  # completion alone

    async def send(self, client: httpx.AsyncClient, kind: str, i: int) -> httpx.Response:
        path, body = good_request(kind, i, self.texts, self.max_tokens)
        return await client.post(path, json=body)

    def check(self, kind: str, i: int, response: httpx.Response) -> str | None:
        """None when the 200 answer is right, else what is wrong with it."""
        got = response.json()
        if kind == "score":
            return mismatch(got, self.evals[i], self.rtol)
        text = got["choices"][0]["text"]
        want = self.solo[(kind, i)]
        return None if text == want else f"completion {text!r}, alone {want!r}"


# --- the server --------------------------------------------------------------------------------


def code_env(pythonpath: Path | None) -> dict[str, str]:
    """The environment that runs the code under test, checked: `import knnlm` must resolve
    inside ``pythonpath`` (or this checkout)."""
    env = dict(os.environ)
    root = (pythonpath or Path(__file__).resolve().parent.parent).resolve()
    if pythonpath is not None:
        env["PYTHONPATH"] = str(root)
    where = subprocess.run(
        [sys.executable, "-c", "import knnlm; print(knnlm.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),  # not this checkout, whose folder would shadow PYTHONPATH
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(root):
        raise SystemExit(f"knnlm resolves to {where}, not inside {root}: check --pythonpath")
    env["KNNLM_SERVE_API_KEY"] = secrets.token_urlsafe(24)
    return env


def describe_code(env: dict[str, str]) -> dict[str, Any]:
    root = Path(env.get("PYTHONPATH") or Path(__file__).resolve().parent.parent)

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "path": relative(str(root)),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def references(
    texts: list[str], flags: list[str], env: dict[str, str], cache: Path | None
) -> list[dict[str, Any]]:
    """`knnlm eval --json` of each text alone, each in its own process, as a user runs it;
    kept in ``cache`` for the same texts, flags and code, since each costs a model load."""
    key = {"texts": texts, "flags": flags, "code": describe_code(env)}
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["evals"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            path = Path(tmp) / f"text{i}.txt"
            path.write_text(text, encoding="utf-8")
            command = [sys.executable, "-m", "knnlm", "eval", str(path), *flags, "-q", "--json"]
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, check=False, cwd=tmp
            )
            if done.returncode != 0:
                raise SystemExit(f"knnlm eval failed on text {i}: {done.stderr.strip()}")
            out.append(json.loads(done.stdout))
            print(f"reference {i + 1}/{len(texts)}: {out[-1]['tokens']} tokens", file=sys.stderr)
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "evals": out}))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    command_flags: list[str], env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "knnlm", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), *command_flags]
    with log.open("wb") as sink:  # the child keeps its own handle
        proc = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir()
        )
    return proc, f"http://127.0.0.1:{port}"


def serve_supports(flag: str, env: dict[str, str]) -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "knnlm", "serve", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return flag in done.stdout


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"knnlm serve exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"knnlm serve was not ready after {timeout:.0f}s")


async def counts(client: httpx.AsyncClient) -> dict[str, int]:
    """The batcher's counters, from /readyz (empty if the server shows none)."""
    ready = (await client.get("/readyz")).json()
    return {k: ready[k] for k in ("requests", "batches", "lm_forwards") if k in ready}


# --- levels ----------------------------------------------------------------------------------


def client_for(base: str, headers: dict[str, str], clients: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    return httpx.AsyncClient(base_url=base, headers=headers, timeout=900, limits=limits)


async def solo_answers(
    base: str, headers: dict[str, str], checker: Checker, plan: list[tuple[str, int]]
) -> None:
    """Each completion of the plan, sent alone, once: the answer every repeat must give."""
    async with client_for(base, headers, 1) as client:
        for kind, i in sorted(set(plan)):
            if kind not in ("greedy", "seeded") or (kind, i) in checker.solo:
                continue
            response = await checker.send(client, kind, i)
            if response.status_code != 200:
                raise SystemExit(
                    f"{kind} completion {i} alone: {response.status_code} {response.text}"
                )
            checker.solo[(kind, i)] = response.json()["choices"][0]["text"]


async def good(
    level: Level, client: httpx.AsyncClient, checker: Checker, kind: str, i: int
) -> None:
    started = time.perf_counter()
    try:
        response = await checker.send(client, kind, i)
    except httpx.HTTPError as exc:
        level.fail("errors", f"{kind} {i}: {type(exc).__name__}: {exc}")
        return
    if response.status_code != 200:
        level.fail("errors", f"{kind} {i}: {response.status_code} {response.text[:200]}")
        return
    level.latencies_ms.append(1000 * (time.perf_counter() - started))
    problem = checker.check(kind, i, response)
    if problem is not None:
        level.fail("wrong", f"{kind} {i}: {problem}")


async def bad(
    level: Level,
    base: str,
    headers: dict[str, str],
    request: tuple[str, str, bytes, dict[str, str]],
) -> None:
    """One hostile request, from a client of its own: a refusal may close its connection."""
    name, path, body, extra = request
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=900) as client:
            response = await client.post(path, content=body, headers=extra)
        status = str(response.status_code)
    except httpx.HTTPError as exc:  # e.g. an oversized body cut off by the server's 413
        status = type(exc).__name__
    level.bad[f"{name}: {status}"] += 1
    if status.startswith("5"):
        level.bad_5xx += 1


async def disconnect(
    level: Level, base: str, headers: dict[str, str], prompt: str, max_tokens: int, events: int
) -> None:
    """A streamed completion whose client closes its connection after ``events`` events."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "stream": True}
    level.disconnects += 1
    seen = 0
    outcome = "left"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=900) as client:
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    outcome = f"status {response.status_code}"
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        if "[DONE]" in line or '"error"' in line:
                            outcome = "error event" if '"error"' in line else "ended first"
                            break
                        seen += 1
                        if seen >= events:
                            break  # leaving the block closes the connection mid-stream
                    else:
                        outcome = "closed without [DONE]"
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
    level.streams[outcome] += 1
    if outcome not in ("left", "ended first"):  # a short completion may end before
        level.disconnect_problems += 1


async def run_level(
    name: str,
    base: str,
    headers: dict[str, str],
    clients: int,
    plan: list[tuple[str, int]],
    checker: Checker,
    hostile: list[tuple[str, str, bytes, dict[str, str]]],
    disconnect_events: int,
    stream_tokens: int,
) -> Level:
    """Send ``plan`` with ``clients`` requests in flight; kinds "bad" and "disconnect" index
    into ``hostile`` and the texts."""
    level = Level(name=name, clients=clients, requests=len(plan))
    todo = iter(plan)
    async with client_for(base, headers, clients) as client:
        before = await counts(client)

        async def worker() -> None:
            for kind, i in todo:  # one shared iterator: each request is sent once
                if kind == "bad":
                    await bad(level, base, headers, hostile[i])
                elif kind == "disconnect":
                    prompt = checker.texts[i][:PROMPT_CHARS]
                    await disconnect(level, base, headers, prompt, stream_tokens, disconnect_events)
                else:
                    await good(level, client, checker, kind, i)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        level.seconds = time.perf_counter() - started
        after = await counts(client)
    level.server = {key: after[key] - before[key] for key in after if key in before}
    return level


async def sigterm_under_load(
    base: str,
    headers: dict[str, str],
    plan: list[tuple[str, int]],
    checker: Checker,
    proc: subprocess.Popen[bytes],
    exit_timeout: float,
) -> tuple[Level, dict[str, Any]]:
    """All of ``plan`` at once; SIGTERM once the first is answered. Each must be answered
    right or refused with 503."""
    level = Level(name="sigterm", clients=len(plan), requests=len(plan))
    first = asyncio.Event()

    async def one(client: httpx.AsyncClient, kind: str, i: int) -> None:
        started = time.perf_counter()
        try:
            response = await checker.send(client, kind, i)
        except httpx.HTTPError as exc:
            level.fail("errors", f"{kind} {i}: dropped: {type(exc).__name__}: {exc}")
            return
        finally:
            first.set()
        if response.status_code == 503:
            level.refused_503 += 1
            return
        if response.status_code != 200:
            level.fail("errors", f"{kind} {i}: {response.status_code} {response.text[:200]}")
            return
        level.latencies_ms.append(1000 * (time.perf_counter() - started))
        problem = checker.check(kind, i, response)
        if problem is not None:
            level.fail("wrong", f"{kind} {i}: {problem}")

    async with client_for(base, headers, len(plan)) as client:
        started = time.perf_counter()
        tasks = [asyncio.create_task(one(client, kind, i)) for kind, i in plan]
        await first.wait()
        proc.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        exited = asyncio.create_task(asyncio.to_thread(wait_exit, proc, exit_timeout))
        await asyncio.gather(*tasks)
        level.seconds = time.perf_counter() - started
        code, killed = await exited
    shutdown = {
        "exit_code": code,
        "seconds_to_exit": round(time.perf_counter() - signalled, 2) if not killed else None,
        "killed_after_s": exit_timeout if killed else None,
    }
    return level, shutdown


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, bool]:
    """The exit code, and whether it had to be killed after ``timeout`` seconds."""
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(), True


# --- report ----------------------------------------------------------------------------------


def write_report(out: Path) -> None:
    """results.md and p50_p99_vs_clients.png from every <label>.json in ``out``."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    order = sorted(runs, key=lambda label: (label != "before", label))
    lines = ["# `knnlm serve` under load, before and after", ""]
    for label in order:
        run = runs[label]
        code = run["code"]
        dirty = ", with uncommitted changes" if code["uncommitted_changes"] else ""
        lines.append(
            f"- **{label}**: commit {code['commit']}{dirty} ({code['path']}); "
            f"{run['texts']} texts of {min(run['text_tokens'])}-{max(run['text_tokens'])} "
            f"tokens; serve flags `{' '.join(run['serve_flags'])}`"
        )
    lines += [
        "",
        "| code | level | clients | requests | req/s | p50 ms | p99 ms | good failed | wrong |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in order:
        for row in runs[label]["levels"]:
            lines.append(
                f"| {label} | {row['name']} | {row['clients']} | {row['requests']} | "
                f"{row['requests_per_second']:.2f} | {row['p50_ms']:,.0f} | {row['p99_ms']:,.0f} | "
                f"{row['errors']} | {row['wrong']} |"
            )
    lines += [
        "",
        "Hostile requests, the SIGTERM, and the first distinct problems of each level:",
        "",
    ]
    for label in order:
        for row in runs[label]["levels"]:
            if row["name"] == "hostile":
                answers = "; ".join(f"{k} ×{v}" for k, v in row["bad"].items())
                streams = ", ".join(f"{k} ×{v}" for k, v in row["streams"].items())
                lines.append(
                    f"- {label}, hostile: {sum(row['bad'].values())} bad requests, "
                    f"{row['bad_5xx']} answered 5xx ({answers}); {row['disconnects']} streams "
                    f"to be left mid-way ({streams}; "
                    f"{row['disconnect_problems']} failed before the client left)"
                )
            if row["name"] == "sigterm":
                stop = runs[label]["shutdown"]
                exit_ = (
                    f"exit {stop['exit_code']} {stop['seconds_to_exit']} s after SIGTERM"
                    if stop["killed_after_s"] is None
                    else f"killed: still running {stop['killed_after_s']} s after SIGTERM"
                )
                lines.append(
                    f"- {label}, SIGTERM with {row['requests']} in flight: "
                    f"{row['good_answered'] - row['wrong']} answered right, "
                    f"{row['refused_503']} refused 503, {row['errors']} failed, "
                    f"{row['wrong']} wrong; {exit_} (shutdown timeout "
                    f"{runs[label]['shutdown_timeout']})"
                )
            for problem in list(dict.fromkeys(row["problems"]))[:3]:
                lines.append(f"  - {label} {row['name']}: `{problem[:160]}`")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(runs, order, out / "p50_p99_vs_clients.png")


def plot(runs: dict[str, Any], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n, label in enumerate(order):
        rows = [r for r in runs[label]["levels"] if r["name"] == "clean"]
        if not rows:
            continue
        clients = [r["clients"] for r in rows]
        color = f"C{n}"
        ax.plot(
            clients, [r["p50_ms"] / 1000 for r in rows], "o-", color=color, label=f"{label} p50"
        )
        ax.plot(
            clients, [r["p99_ms"] / 1000 for r in rows], "s--", color=color, label=f"{label} p99"
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (s)")
    ax.set_title("knnlm serve: latency of good requests vs clients")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def load_texts(paths: list[str], glob: str, max_texts: int, max_chars: int) -> list[str]:
    from ingest.corpus import read_corpus

    texts: list[str] = []
    for doc in read_corpus(paths, glob=glob):
        text = doc.text[:max_chars]
        if text.strip() and text not in texts:
            texts.append(text)
        if len(texts) == max_texts:
            break
    if not texts:
        raise SystemExit("no text found in the files given")
    return texts


def make_plan(
    rng: random.Random,
    n: int,
    texts: int,
    share: float,
    bad: float = 0.0,
    gone: float = 0.0,
    hostile: int = 0,
) -> list[tuple[str, int]]:
    """``n`` requests: ``bad`` of them hostile (every kind in turn, at random places),
    ``gone`` streams left mid-way, the rest scores and (a ``share`` of them) completions, half
    greedy, half seeded."""
    plan = []
    for _ in range(n):
        if rng.random() < share:
            plan.append((rng.choice(["greedy", "seeded"]), rng.randrange(texts)))
        else:
            plan.append(("score", rng.randrange(texts)))
    n_bad, n_gone = round(n * bad), round(n * gone)
    places = rng.sample(range(n), n_bad + n_gone)
    for k, place in enumerate(places[:n_bad]):
        plan[place] = ("bad", k % hostile)
    for place in places[n_bad:]:
        plan[place] = ("disconnect", rng.randrange(texts))
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- (model, store, search) go to both `knnlm eval` and `knnlm serve`.",
    )
    parser.add_argument("paths", nargs="*", help="Files or folders of texts to score.")
    parser.add_argument("--glob", default="**/*", help="Files to read inside folders.")
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=64, help="Requests per level.")
    parser.add_argument("--max-texts", type=int, default=6, help="Distinct texts at most.")
    parser.add_argument("--max-chars", type=int, default=800, help="Characters per text.")
    parser.add_argument("--completions-share", type=float, default=0.25)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--hostile-clients", type=int, default=16, help="0: no hostile level.")
    parser.add_argument("--hostile-requests", type=int, default=128)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--disconnect-events", type=int, default=3)
    parser.add_argument("--sigterm-requests", type=int, default=16, help="0: stop with SIGINT.")
    parser.add_argument("--shutdown-timeout", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=16, help="`knnlm serve --max-batch`.")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-completion-tokens", type=int, default=64)
    parser.add_argument("--max-text-tokens", type=int, default=1024)
    parser.add_argument("--max-body-bytes", type=int, default=200_000)
    parser.add_argument("--rtol", type=float, default=RTOL, help="Of a score's perplexities.")
    parser.add_argument("--seed", type=int, default=0, help="Order of the request mix.")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--label", default="after", help="Name of this run in the report.")
    parser.add_argument("--pythonpath", type=Path, help="Run the knnlm code of this checkout.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/service_load"))
    parser.add_argument(
        "--references", type=Path, help="Keep the `knnlm eval` answers in this JSON file."
    )
    parser.add_argument("--report", action="store_true", help="Only redraw the report.")
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_report(args.out)
        return
    if not args.paths:
        parser.error("name the files or folders of texts")
    if not 0.0 <= args.completions_share <= 1.0:
        parser.error("--completions-share must lie in [0, 1]")

    texts = load_texts(args.paths, args.glob, args.max_texts, args.max_chars)
    env = code_env(args.pythonpath)
    code = describe_code(env)
    print(f"code under test: {code}", file=sys.stderr)
    headers = {"Authorization": f"Bearer {env['KNNLM_SERVE_API_KEY']}"}
    refs = references(texts, flags, env, args.references)
    checker = Checker(texts, refs, args.completion_tokens, args.rtol)
    limits = {
        "max_completion_tokens": args.max_completion_tokens,
        "max_text_tokens": args.max_text_tokens,
        "max_body_bytes": args.max_body_bytes,
    }
    hostile = bad_requests(limits)
    serve_flags = ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    for name, value in limits.items():
        serve_flags += [f"--{name.replace('_', '-')}", str(value)]
    shutdown_timeout = None
    if serve_supports("--shutdown-timeout", env):
        shutdown_timeout = args.shutdown_timeout
        serve_flags += ["--shutdown-timeout", str(shutdown_timeout)]
    rng = random.Random(args.seed)
    plans = [make_plan(rng, args.requests, len(texts), args.completions_share) for _ in args.levels]
    hostile_plan = make_plan(
        rng,
        args.hostile_requests,
        len(texts),
        args.completions_share,
        args.bad_share,
        args.disconnect_share,
        len(hostile),
    )
    sigterm_plan = make_plan(rng, args.sigterm_requests, len(texts), args.completions_share)
    fd, name = tempfile.mkstemp(prefix=f"knnlm-serve-{args.label}-", suffix=".log")
    os.close(fd)
    log = Path(name)
    proc, base = start_server([*serve_flags, *flags], env, log)
    levels: list[Level] = []
    shutdown: dict[str, Any] = {}
    try:
        asyncio.run(wait_ready(base, proc, args.startup_timeout, log))
        every = [*(p for plan in plans for p in plan), *hostile_plan, *sigterm_plan]
        asyncio.run(solo_answers(base, headers, checker, every))

        def measure(kind: str, clients: int, plan: Any) -> None:
            level = asyncio.run(
                run_level(
                    kind,
                    base,
                    headers,
                    clients,
                    plan,
                    checker,
                    hostile,
                    args.disconnect_events,
                    args.max_completion_tokens,
                )
            )
            levels.append(level)
            print(f"{args.label}: {level.to_dict()}", file=sys.stderr)

        for clients, plan in zip(args.levels, plans, strict=True):
            measure("clean", clients, plan)
        if args.hostile_clients:
            measure("hostile", args.hostile_clients, hostile_plan)
        if args.sigterm_requests:
            exit_timeout = (shutdown_timeout or args.shutdown_timeout) + 60
            level, shutdown = asyncio.run(
                sigterm_under_load(base, headers, sigterm_plan, checker, proc, exit_timeout)
            )
            levels.append(level)
            print(f"{args.label}: {level.to_dict()} {shutdown}", file=sys.stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            code_, _ = wait_exit(proc, 120)
            shutdown.setdefault("exit_code", code_)

    result = {
        "label": args.label,
        "code": code,
        "flags": flags,
        "serve_flags": serve_flags,
        "shutdown_timeout": shutdown_timeout,
        "texts": len(texts),
        "text_tokens": [r["tokens"] for r in refs],
        "completions_share": args.completions_share,
        "completion_tokens": args.completion_tokens,
        "rtol": args.rtol,
        "shutdown": shutdown,
        "levels": [level.to_dict() for level in levels],
    }
    (args.out / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}; server log {log}", file=sys.stderr)
    failed = sum(level.errors + level.wrong + level.bad_5xx for level in levels)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
