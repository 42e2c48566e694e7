"""Load test of `knnlm serve`: throughput and latency at 1, 8 and 64 concurrent clients, with
every /v1/score answer checked against `knnlm eval --json` on the same text.

The collection must exist. The settings reach both `knnlm eval` (the references, computed
first: the embedded store admits one process at a time) and `knnlm serve` in two ways:
``KNNLM_*`` variables (``KNNLM_COLLECTION=kernel-docs``, ``KNNLM_MODEL``, ``KNNLM_DATA_DIR``,
``KNNLM_TOP_K``, ...), which both inherit, and flags after ``--``, given to both. Texts are the
documents of the files and folders named (each cut to ``--max-chars``); a request is a
/v1/score of one of them, or with ``--completions-share``, a greedy /v1/completions of its
start (all answers for one prompt must agree). Prints one row per level, writes JSON to
``--out``, and exits 1 on any error or wrong answer. Nothing here asserts on time.

    KNNLM_COLLECTION=kernel-docs python benchmarks/service_load.py held-out/ --glob '*.rst'
    python benchmarks/service_load.py a.txt b.txt --requests 32 -- --collection docs --top-k 64
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ingest.corpus import read_corpus

# Windows pad to the same width in any batch, so the keys and neighbours are the same; a
# float32 reduction split differently across threads may still move a token's score in its
# last bit (seen: 1e-9 relative in a perplexity). A lambda bucket flipped costs 4e-4.
RTOL = 1e-6


@dataclass
class Level:
    clients: int
    requests: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wrong: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, for the report
    server: dict[str, int] = field(default_factory=dict)  # the batcher's counts in the level

    def fail(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 5:
            self.problems.append(what)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests / self.seconds, 2) if self.seconds else 0,
            "p50_ms": round(self.percentile(0.5), 1),
            "p99_ms": round(self.percentile(0.99), 1),
            "errors": self.errors,
            "wrong": self.wrong,
            "problems": self.problems,
            "server": self.server,
        }


def load_texts(paths: list[str], glob: str, max_texts: int, max_chars: int) -> list[str]:
    texts = []
    for doc in read_corpus(paths, glob=glob):
        text = doc.text[:max_chars]
        if text.strip() and text not in texts:
            texts.append(text)
        if len(texts) == max_texts:
            break
    if not texts:
        raise SystemExit("no text found in the files given")
    return texts


def references(texts: list[str], flags: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    """`knnlm eval --json` of each text alone, each in its own process, as a user runs it."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            path = Path(tmp) / f"text{i}.txt"
            path.write_text(text, encoding="utf-8")
            command = [sys.executable, "-m", "knnlm", "eval", str(path), *flags, "-q", "--json"]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"knnlm eval failed on text {i}: {done.stderr.strip()}")
            out.append(json.loads(done.stdout))
            print(f"reference {i + 1}/{len(texts)}: {out[-1]['tokens']} tokens", file=sys.stderr)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    flags: list[str], serve_flags: list[str], env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "knnlm", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), *serve_flags, *flags]
    with log.open("wb") as sink:  # the child keeps its own handle
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


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


def mismatch(got: dict[str, Any], want: dict[str, Any]) -> str | None:
    """How /v1/score's answer differs from eval's, or None."""
    if got["tokens_count"] != want["tokens"]:
        return f"{got['tokens_count']} tokens, eval {want['tokens']}"
    for key in ("base_perplexity", "knn_perplexity"):
        mine, theirs = got[key], want[key]
        if mine is None and theirs is None:  # both infinite (JSON null)
            continue
        if mine is None or theirs is None or not math.isclose(mine, theirs, rel_tol=RTOL):
            return f"{key} {mine}, eval {theirs}"
    return None


async def run_level(
    base: str,
    headers: dict[str, str],
    clients: int,
    plan: list[tuple[str, int]],
    texts: list[str],
    refs: list[dict[str, Any]],
    completions: dict[int, str],
    max_tokens: int,
) -> Level:
    level = Level(clients=clients, requests=len(plan))
    todo = iter(plan)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=600, limits=limits
    ) as client:
        before = (await client.get("/readyz")).json()

        async def worker() -> None:
            for kind, i in todo:  # one shared iterator: each request is sent once
                if kind == "score":
                    path, body = "/v1/score", {"text": texts[i]}
                else:
                    prompt = texts[i][:200]
                    path = "/v1/completions"
                    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                started = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                except httpx.HTTPError as exc:
                    level.fail("errors", f"{path}: {type(exc).__name__}: {exc}")
                    continue
                level.latencies_ms.append(1000 * (time.perf_counter() - started))
                if response.status_code != 200:
                    level.fail("errors", f"{path}: {response.status_code} {response.text[:200]}")
                    continue
                got = response.json()
                if kind == "score":
                    problem = mismatch(got, refs[i])
                else:  # greedy: every answer for a prompt is the first one's
                    text = got["choices"][0]["text"]
                    first = completions.setdefault(i, text)
                    problem = None if text == first else f"completion {text!r} != {first!r}"
                if problem is not None:
                    level.fail("wrong", f"text {i}: {problem}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        level.seconds = time.perf_counter() - started
        after = (await client.get("/readyz")).json()
    level.server = {key: after[key] - before[key] for key in ("requests", "batches", "lm_forwards")}
    return level


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- (model, store, search) go to both `knnlm eval` and `knnlm serve`.",
    )
    parser.add_argument("paths", nargs="+", help="Files or folders of texts to score.")
    parser.add_argument("--glob", default="**/*", help="Files to read inside folders.")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=128, help="Requests per level.")
    parser.add_argument("--max-texts", type=int, default=16, help="Distinct texts at most.")
    parser.add_argument("--max-chars", type=int, default=4000, help="Characters per text.")
    parser.add_argument("--completions-share", type=float, default=0.0)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16, help="`knnlm serve --max-batch`.")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0, help="Order of the request mix.")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/service_load.json"))
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not 0.0 <= args.completions_share <= 1.0:
        parser.error("--completions-share must lie in [0, 1]")

    texts = load_texts(args.paths, args.glob, args.max_texts, args.max_chars)
    env = {**os.environ, "KNNLM_SERVE_API_KEY": secrets.token_urlsafe(24)}
    headers = {"Authorization": f"Bearer {env['KNNLM_SERVE_API_KEY']}"}
    refs = references(texts, flags, env)
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="knnlm-serve-", suffix=".log")
    os.close(fd)
    log = Path(name)
    serve_flags = ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    serve_flags += ["--max-completion-tokens", str(max(args.completion_tokens, 1))]
    proc, base = start_server(flags, serve_flags, env, log)
    levels: list[Level] = []
    completions: dict[int, str] = {}
    try:
        asyncio.run(wait_ready(base, proc, args.startup_timeout, log))
        for clients in args.levels:
            plan = [
                (
                    "complete" if rng.random() < args.completions_share else "score",
                    rng.randrange(len(texts)),
                )
                for _ in range(args.requests)
            ]
            level = asyncio.run(
                run_level(
                    base,
                    headers,
                    clients,
                    plan,
                    texts,
                    refs,
                    completions,
                    args.completion_tokens,
                )
            )
            levels.append(level)
    finally:
        code = stop_server(proc)

    print(
        f"{'clients':>7}  {'requests':>8}  {'req/s':>7}  {'p50 ms':>8}  {'p99 ms':>8}  "
        f"{'errors':>6}  {'wrong':>5}"
    )
    for level in levels:
        row = level.to_dict()
        print(
            f"{row['clients']:>7}  {row['requests']:>8}  {row['requests_per_second']:>7.2f}  "
            f"{row['p50_ms']:>8.1f}  {row['p99_ms']:>8.1f}  {row['errors']:>6}  {row['wrong']:>5}"
        )
        for problem in level.problems:
            print(f"  {problem}", file=sys.stderr)
    result = {
        "flags": flags,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "texts": len(texts),
        "text_tokens": [r["tokens"] for r in refs],
        "completions_share": args.completions_share,
        "server_exit_code": code,
        "levels": [level.to_dict() for level in levels],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}; server log {log}", file=sys.stderr)
    bad = sum(level.errors + level.wrong for level in levels)
    if bad or code != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
