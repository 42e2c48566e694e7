"""A Qdrant server as the store, side by side with Qdrant Edge in the same run.

SmolLM2-135M ``ffn_input`` keys of the Linux kernel docs (``kernel_docs.py``'s interleaved
split, 300k datastore tokens), default storage settings (float16 keys on disk, turbo4 codes
in RAM, no rescore), k = 1024. Every stage is resumable (results land in
``<work>/bench/*.json`` and are reused); the server is one you started (this script never
starts one):

    python benchmarks/server.py ingest        # knnlm ingest into Edge, then knnlm tune
    python benchmarks/server.py push          # knnlm push Edge -> the server
    python benchmarks/server.py eval          # base LM, Edge, server REST, server gRPC
    python benchmarks/server.py search        # each store's search alone, and raw clients
    python benchmarks/server.py rebuilt       # Edge's perplexity with its HNSW built anew
    python benchmarks/server.py pinned --server-pid PID  # server on core 0, knnlm on core 1
    python benchmarks/server.py ingest-speed  # ingest into the server vs into Edge
    python benchmarks/server.py report        # results.md, results.json and the plot

With ``--levers`` the ingest stage also copies the collection with successor links (named
``<collection>-linked``) and tunes it with ``--fit-levers``; push and eval then use that copy,
and eval adds runs with the document cache and pointers. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.kernel_docs import make_splits  # noqa: E402
from benchmarks.paths import relative  # noqa: E402

DOMAIN = "kernel-docs"
K = 1024
WINDOW, STRIDE = 512, 256
EVAL_TOKENS = 12_000  # per held-out split, as scale.py


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "stage",
        choices=["ingest", "push", "eval", "search", "rebuilt", "pinned", "ingest-speed", "report"],
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        help="pinned: the server's process, put on core 0 (else start it with taskset -c 0)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "kd-server")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/server")
    parser.add_argument("--tokens", type=int, default=300_000, help="datastore tokens")
    parser.add_argument("--url", default="http://127.0.0.1:6333", help="the Qdrant server")
    parser.add_argument("--grpc-port", type=int, default=6334, help="the server's gRPC port")
    parser.add_argument("--collection", default="kd-server", help="the name on both stores")
    parser.add_argument(
        "--levers",
        action="store_true",
        help="also the tuned levers: the collection linked for pointer following (`knnlm "
        "rebuild --successors`, named <collection>-linked) is tuned with --fit-levers, pushed "
        "and evaluated with and without the document cache and pointers",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=EVAL_TOKENS,
        help="tokens of each held-out split (validation, test); small for a trial run",
    )
    args = parser.parse_args()
    bench = Bench(
        args.work,
        args.results,
        args.tokens,
        args.url,
        args.grpc_port,
        args.collection,
        args.levers,
        args.eval_tokens,
    )
    stage: Callable[[], Any] = {
        "ingest": bench.ingest,
        "push": bench.push,
        "eval": bench.evaluate,
        "search": bench.search,
        "rebuilt": bench.rebuilt,
        "pinned": lambda: bench.pinned(args.server_pid),
        "ingest-speed": bench.ingest_speed,
        "report": bench.report,
    }[args.stage]
    stage()


class Bench:
    def __init__(
        self,
        work: Path,
        results: Path,
        tokens: int,
        url: str,
        grpc_port: int,
        name: str,
        levers: bool = False,
        eval_tokens: int = EVAL_TOKENS,
    ) -> None:
        self.work = work
        # (a pure function of the file names; a new size empties ``work`` first)
        self.splits = make_splits(work, "interleaved", tokens, eval_tokens)
        self.out = work / "bench"
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = results
        self.tokens = tokens
        self.url = url
        self.grpc_port = grpc_port
        self.levers = levers
        self.name = f"{name}-linked" if levers else name  # pushed and evaluated
        self.ingested = name

    # --- helpers ---------------------------------------------------------------------------

    def settings(self, backend: str = "edge", **changes: Any):
        from knn_store import KnnlmSettings

        fields: dict[str, Any] = {
            "data_dir": self.work / "data",
            "collection": self.name,
            "window": WINDOW,
            "stride": STRIDE,
            "key_type": "ffn_input",
            "top_k": K,
            "backend": backend,
        }
        if backend == "qdrant":
            fields |= {"url": self.url, "grpc_port": self.grpc_port}
        return KnnlmSettings(**{**fields, **changes})

    def env(self) -> dict[str, str]:
        return {
            "KNNLM_BACKEND": "edge",  # the source; push names its target
            "KNNLM_DATA_DIR": str(self.work / "data"),
            "KNNLM_COLLECTION": self.name,
            "KNNLM_WINDOW": str(WINDOW),
            "KNNLM_STRIDE": str(STRIDE),
            "KNNLM_KEY_TYPE": "ffn_input",
            "KNNLM_TOP_K": str(K),
        }

    def saved(self, name: str) -> dict[str, Any] | None:
        path = self.out / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, name: str, data: Any) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(data, indent=1))

    def texts(self, split: str) -> list[str]:
        from ingest.corpus import read_corpus

        return [d.text for d in read_corpus([self.splits[split]], glob="*.rst.gz")]

    def knnlm(
        self, *args: str, json_report: bool = True, collection: str | None = None
    ) -> tuple[Any, float]:
        """The command's --json report (its last line), or its printed output, and its
        wall seconds; on ``collection`` (default: the one pushed and evaluated)."""
        command = [str(ROOT / ".venv/bin/knnlm"), *args, *(["--json"] if json_report else [])]
        print("$ knnlm", " ".join(args), file=sys.stderr, flush=True)
        started = time.perf_counter()
        env = self.env() | ({"KNNLM_COLLECTION": collection} if collection else {})
        done = subprocess.run(
            command,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - started
        if not json_report:
            return done.stdout, seconds
        return json.loads(done.stdout.strip().splitlines()[-1]), seconds

    # --- stages ----------------------------------------------------------------------------

    def ingest(self) -> None:
        """The Edge collection through the CLI (default storage), then `knnlm tune` on the
        validation split: the policy and gate every eval below uses.

        With levers, the ingested collection is first copied with successor links (`knnlm
        rebuild --successors`, no LM) and the tune fits the document cache and the pointer
        threshold too; the linked copy is the one pushed and evaluated."""
        if not self.saved("ingest"):
            report, seconds = self.knnlm(
                "ingest",
                self.splits["datastore"],
                "--glob",
                "*.rst.gz",
                "--domain",
                DOMAIN,
                collection=self.ingested,
            )
            self.save("ingest", {"report": report, "wall_seconds": seconds})
        if self.levers and not self.saved("successors"):
            report, seconds = self.knnlm(
                "rebuild",
                "--to-collection",
                self.name,
                "--successors",
                collection=self.ingested,
                json_report=False,
            )
            self.save("successors", {"summary": report.strip(), "wall_seconds": seconds})
        if not self.saved("tune"):
            levers = ["--fit-levers", "--pointer-budget", "0.2"] if self.levers else []
            report, seconds = self.knnlm(
                "tune", self.splits["validation"], "--glob", "*.rst.gz", *levers
            )
            self.save("tune", {"report": report, "wall_seconds": seconds})

    def wait_indexed(self, *, share: float = 0.0, timeout: float = 3600.0) -> dict[str, Any]:
        """Wait until the server's collection is green (its optimizer builds HNSW in the
        background), with at least ``share`` of its points in indexed segments; the seconds
        waited and what it reports."""
        from qdrant_client import QdrantClient

        client = QdrantClient(url=self.url, check_compatibility=False, timeout=60)
        started = time.perf_counter()
        green_since = None
        try:
            while True:
                info = client.get_collection(self.name)
                points = info.points_count or 0
                indexed = info.indexed_vectors_count or 0
                green = str(getattr(info.status, "value", info.status)) == "green"
                done = green and indexed >= share * points
                if done and green_since is None:
                    green_since = time.perf_counter()
                elif not done:
                    green_since = None
                if green_since is not None and time.perf_counter() - green_since >= 2.0:
                    break  # green twice in 2 s: the optimizer has nothing left to do
                if time.perf_counter() - started > timeout:
                    print(f"not indexed after {timeout:.0f} s: {info.status}", file=sys.stderr)
                    break
                time.sleep(0.5)
        finally:
            client.close()
        assert green_since is not None or time.perf_counter() - started > timeout
        return {
            "seconds": (green_since or time.perf_counter()) - started,
            "points": points,
            "indexed_vectors": indexed,
            "segments": info.segments_count,
            "status": str(getattr(info.status, "value", info.status)),
        }

    def push(self) -> None:
        """`knnlm push` of the Edge collection to the server, then the wait until the
        server has built its index (the copy turns HNSW on at its end)."""
        if self.saved("push"):
            return
        load = os.getloadavg()
        done, seconds = self.knnlm("push", "--to-url", self.url, "--quiet", json_report=False)
        summary = done.strip().splitlines()[-1]
        found = re.search(
            r"copied ([\d,]+) points.*: ([\d,]+) on both sides.*, ([\d.]+)s;", summary
        )
        assert found, summary
        copied, points = (int(found[i].replace(",", "")) for i in (1, 2))
        copy_seconds = float(found[3])
        index = self.wait_indexed(share=0.99)
        result = {
            "points": points,
            "copied": copied,
            "copy_seconds": copy_seconds,
            "points_per_s": copied / copy_seconds,
            "command_wall_seconds": seconds,
            "points_per_s_wall": copied / seconds,
            "index": index,
            "points_per_s_with_index": copied / (seconds + index["seconds"]),
            "summary": summary.replace(self.url, "<url>"),
            "load_average_before": load,
        }
        self.save("push", result)
        print(json.dumps(result, indent=1), file=sys.stderr)

    def backends(self, threads: tuple[int, ...] = (1, 2)) -> list[tuple[str, Any]]:
        """The stores compared, by label: Edge (its default search pool: one thread per
        CPU), and the server over REST and over gRPC with ``threads`` concurrent requests
        per batch."""
        out: list[tuple[str, Any]] = [("edge", self.settings())]
        for threads_ in threads:
            for grpc in (False, True):
                label = f"server {'gRPC' if grpc else 'REST'}"
                label += "" if threads_ == 1 else f", {threads_} threads"
                out.append(
                    (label, self.settings("qdrant", prefer_grpc=grpc, search_threads=threads_))
                )
        return out

    def evaluate(self) -> None:
        """Base LM and kNN-LM on each store, in turns over the same chunks in one process:
        perplexity, search ms/query and tokens/s. Keeps the test split's keys (the queries of
        the ``search`` stage)."""
        import numpy as np

        from knn_store import load_language_model, open_session

        if self.saved("eval"):
            return
        texts = self.texts("test")
        chunks = [texts[i::3] for i in range(min(3, len(texts)))]  # 3 turns, or fewer texts
        lm = load_language_model(self.settings())
        sessions = {label: open_session(s, lm=lm) for label, s in self.backends(threads=(1,))}
        # each store's kNN-LM as tuned (gate and levers), and without the levers
        tuned = {label: s.knn_lm for label, s in sessions.items()}
        plain = {label: m.with_options(pointer_min=0, cache=None) for label, m in tuned.items()}
        gates = {label: m.gate for label, m in tuned.items()}
        has_levers = tuned["edge"].uses_memory
        runs = [(label, False, False) for label in sessions]
        if gates["edge"] is not None:  # the tuned policy has a gate: also with it
            runs += [(label, True, False) for label in sessions]
        if has_levers:  # and with the document cache and pointers it fitted
            runs += [(label, gates[label] is not None, True) for label in sessions]
        edge = sessions["edge"]
        for session in sessions.values():  # connections, caches, first pages
            session.knn_lm.evaluate(session.encode([texts[0][:3000]]))
        state = self.saved("eval_partial") or {"chunks_done": 0, "base": {}, "runs": {}}
        keys: list[np.ndarray] = []
        for c, chunk in enumerate(chunks):
            seqs = edge.encode(chunk)
            if c < state["chunks_done"]:
                keys += [v.keys.numpy() for v in edge.knn_lm.lm_views(seqs)]
                continue
            load = os.getloadavg()
            # the base LM before and after the turn's kNN-LM runs, each store in turn
            chunk_keys = self._base_pass(edge.knn_lm, seqs, state["base"])
            keys += chunk_keys
            for label, gate, levers in runs[c % len(runs) :] + runs[: c % len(runs)]:
                knn_lm = (tuned if levers else plain)[label]
                knn_lm.gate = gates[label] if gate else None
                started = time.perf_counter()
                result = knn_lm.evaluate(seqs)
                seconds = time.perf_counter() - started
                name = _run_name(label, gate, levers)
                _add(
                    state["runs"].setdefault(
                        name, {"backend": label, "gate": gate, "levers": levers}
                    ),
                    seconds=seconds,
                    tokens=result.tokens,
                    knn_nll=result.knn_nll,
                    base_nll=result.base_nll,
                    searches=result.queries,
                    followed=result.followed or 0,
                    search_seconds=result.search_seconds,
                    lm_seconds=result.lm_seconds,
                )
                print(
                    f"turn {c}: {name}: {result.tokens / seconds:.0f} tok/s, "
                    f"{result.search_ms_per_query:.2f} ms/query",
                    file=sys.stderr,
                    flush=True,
                )
            self._base_pass(edge.knn_lm, seqs, state["base"])
            state["load_averages"] = [*state.get("load_averages", []), [load, os.getloadavg()]]
            state["chunks_done"] = c + 1
            state["chunks_planned"] = len(chunks)
            self.save("eval_partial", state)
        np.save(self.out / "test_keys.npy", np.concatenate(keys).astype(np.float32))
        versions = _versions(sessions)
        for session in sessions.values():
            session.close()
        self.save("eval", _eval_rows(state, versions))

    @staticmethod
    def _base_pass(knn_lm: Any, seqs: list[Any], acc: dict[str, Any]) -> list[Any]:
        """The LM part of the pipeline alone (the base LM's cost), timed into ``acc``; the
        keys of every scored position."""
        started = time.perf_counter()
        views = list(knn_lm.lm_views(seqs))
        _add(
            acc,
            seconds=time.perf_counter() - started,
            tokens=sum(len(v.targets) for v in views),
            passes=1,
        )
        return [v.keys.numpy() for v in views]

    def search(self) -> None:
        """Each store's search of the test split's keys without the LM running, in turns
        over three parts, in batches of 256 as eval sends them: the engine and transport
        call (hits decoded), and turning the hits into [b, k] arrays. Beside the stores, the
        same server searched through qdrant-client's models (the path before the lean
        transport), and the server's own time (its answers' ``time``)."""
        import numpy as np

        from knn_store import load_language_model, open_session
        from knn_store.store.base import PointFilter, neighbours_from_hits

        if self.saved("search"):
            return
        lm = load_language_model(self.settings())
        sessions = {label: open_session(s, lm=lm) for label, s in self.backends()}
        keys_path = self.out / "test_keys.npy"
        if not keys_path.is_file():
            seqs = sessions["edge"].encode(self.texts("test"))
            views = sessions["edge"].knn_lm.lm_views(seqs)
            np.save(keys_path, np.concatenate([v.keys.numpy() for v in views]))
        queries = np.load(keys_path)
        options = sessions["edge"].knn_lm.search
        searchers: dict[str, Callable[[Any], tuple[Any, float | None]]] = {}
        for label, session in sessions.items():

            def through_store(batch: Any, store: Any = session.store) -> Any:
                wire = getattr(store, "wire", None)
                before = wire.server_seconds if wire is not None else 0.0
                hits = store._search(batch, k=K, options=options, filter=PointFilter())
                return hits, None if wire is None else wire.server_seconds - before

            searchers[label] = through_store
        for transport in ("REST", "gRPC"):
            store = sessions[f"server {transport}"].store
            searchers[f"server {transport}, qdrant-client models"] = lambda b, store=store: (
                _model_search(store, b, options)
            )
        labels = list(searchers)
        out: dict[str, dict[str, Any]] = {label: {} for label in labels}
        first: dict[str, list[set[str]]] = {}
        batch_size = sessions["edge"].knn_lm.search_batch
        for run in searchers.values():  # connections, caches, first pages
            run(queries[:batch_size])
        for p, rows in enumerate(np.array_split(np.arange(len(queries)), 3)):
            for label in labels[p % len(labels) :] + labels[: p % len(labels)]:
                for lo in range(0, len(rows), batch_size):
                    batch = queries[rows[lo : lo + batch_size]]
                    started = time.perf_counter()
                    hits, server = searchers[label](batch)
                    middle = time.perf_counter()
                    found = neighbours_from_hits(hits, k=K)
                    _add(
                        out[label],
                        queries=len(batch),
                        call_seconds=middle - started,
                        ids_seconds=time.perf_counter() - middle,
                    )
                    if server is not None:
                        _add(out[label], server_seconds=server)
                    if p == 0 and lo == 0:
                        assert found.point_ids is not None
                        first[label] = [{str(i) for i in row if i} for row in found.point_ids]
        for session in sessions.values():
            session.close()
        for label, acc in out.items():
            acc["call_ms_per_query"] = 1000 * acc["call_seconds"] / acc["queries"]
            acc["ids_ms_per_query"] = 1000 * acc["ids_seconds"] / acc["queries"]
            acc["ms_per_query"] = acc["call_ms_per_query"] + acc["ids_ms_per_query"]
            if "server_seconds" in acc:
                acc["server_ms_per_query"] = 1000 * acc["server_seconds"] / acc["queries"]
            acc["same_neighbours_as_edge"] = float(
                np.mean([len(a & b) / K for a, b in zip(first[label], first["edge"], strict=True)])
            )
        self.save("search", out)
        print(json.dumps(out, indent=1), file=sys.stderr)

    def rebuilt(self) -> None:
        """How far another HNSW build of the same points moves Edge's results: `knnlm
        rebuild` into a second Edge collection with the same settings (its index built anew),
        its test perplexity without the gate; then recall@k of Edge, the rebuilt Edge and the
        server against an exact search, on every 25th test query."""
        import numpy as np

        from knn_store import load_language_model, open_session, open_store
        from knn_store.store.config import SearchOptions

        name = f"{self.name}-rebuilt"
        saved = self.saved("rebuilt")
        if not saved:
            _, seconds = self.knnlm(
                "rebuild", "--to-collection", name, "--quiet", json_report=False
            )
            settings = self.settings(collection=name, gate=False)
            with open_session(settings, lm=load_language_model(settings)) as session:
                result = session.evaluate(self.texts("test"))
            saved = {
                "collection": name,
                "rebuild_wall_seconds": seconds,
                "test_perplexity": result.knn_perplexity,
                "tokens": result.tokens,
            }
            self.save("rebuilt", saved)
        if "exact_same_tokens" in next(iter(saved.get("recall", {"": {}}).values())):
            return
        if not (self.out / "test_keys.npy").is_file():
            return
        queries = np.load(self.out / "test_keys.npy")[::25]
        stores = {
            "edge": self.settings(),
            "edge, HNSW built again": self.settings(collection=name),
            "server REST": self.settings("qdrant"),
            "server gRPC": self.settings("qdrant", prefer_grpc=True),
        }
        found, exact = {}, {}
        for label, settings in stores.items():
            with open_store(settings) as store:
                found[label] = store.search(queries, k=K, options=settings.search_options())
                exact[label] = store.search(queries, k=K, options=SearchOptions(exact=True))
        reference = exact["edge"].sq_distances
        saved["recall"] = {
            label: {
                "queries": len(queries),
                "recall": _recall(found[label].sq_distances, reference),
                "exact_recall": _recall(exact[label].sq_distances, reference),
                # the exact neighbours themselves: the same token at every rank, and how
                # far the squared distances of the two engines differ
                "exact_same_tokens": float(
                    (exact[label].token_ids == exact["edge"].token_ids).mean()
                ),
                "exact_max_sq_distance_difference": float(
                    np.abs(exact[label].sq_distances - reference).max()
                ),
            }
            for label in stores
        }
        self.save("rebuilt", saved)

    def pinned(self, server_pid: int | None) -> None:
        """A remote server, modelled on this machine: the server on core 0, this process
        (the LM, the kNN-LM's decoding and Edge alike) on core 1 with one torch thread. The
        base LM and the kNN-LM over Edge, the server's REST and its gRPC on a third of the
        test split, in turns; then the same with both on both cores (shared)."""
        import torch

        from knn_store import load_language_model, open_session

        saved = self.saved("pinned") or {}
        texts = self.texts("test")[::3]
        labels = {
            "edge": self.settings(),
            "server REST": self.settings("qdrant"),
            "server gRPC": self.settings("qdrant", prefer_grpc=True),
        }
        everything = set(range(os.cpu_count() or 1))
        for layout in ("own core", "shared cores"):
            if layout in saved:
                continue
            mine = {max(everything)} if layout == "own core" else everything
            if server_pid is not None:
                os.sched_setaffinity(server_pid, {0} if layout == "own core" else everything)
            os.sched_setaffinity(0, mine)
            torch.set_num_threads(len(mine))
            lm = load_language_model(self.settings())
            sessions = {label: open_session(s, lm=lm) for label, s in labels.items()}
            edge = sessions["edge"]
            seqs = edge.encode(texts)
            for session in sessions.values():  # connections, caches, first pages
                session.knn_lm.evaluate(seqs[:1])
            runs: dict[str, dict[str, Any]] = {}
            base: dict[str, Any] = {}
            for turn in range(2):
                self._base_pass(edge.knn_lm, seqs, base)
                order = list(sessions)[turn:] + list(sessions)[:turn]
                for label in order:
                    started = time.perf_counter()
                    result = sessions[label].knn_lm.evaluate(seqs)
                    _add(
                        runs.setdefault(label, {}),
                        seconds=time.perf_counter() - started,
                        tokens=result.tokens,
                        knn_nll=result.knn_nll,
                        searches=result.queries,
                        search_seconds=result.search_seconds,
                    )
                    rate = result.tokens / (time.perf_counter() - started)
                    print(f"{layout}: {label}: {rate:.0f} tok/s", file=sys.stderr, flush=True)
            self._base_pass(edge.knn_lm, seqs, base)
            for session in sessions.values():
                session.close()
            base_tps = base["tokens"] / base["seconds"]
            saved[layout] = {
                "process_cpus": sorted(mine),
                "server_pinned": server_pid is not None,
                "torch_threads": len(mine),
                "base_tokens_per_s": base_tps,
                "runs": {
                    label: {
                        "test_perplexity": math.exp(run["knn_nll"] / run["tokens"]),
                        "knn_tokens_per_s": run["tokens"] / run["seconds"],
                        "ratio": run["tokens"] / run["seconds"] / base_tps,
                        "search_ms_per_query": 1000
                        * run["search_seconds"]
                        / max(run["searches"], 1),
                        "tokens": run["tokens"],
                    }
                    for label, run in runs.items()
                },
            }
            self.save("pinned", saved)
        os.sched_setaffinity(0, everything)
        if server_pid is not None:
            os.sched_setaffinity(server_pid, everything)

    def extra_documents(self, lm: Any, tokens: int = 24_000) -> list[Any]:
        """Documents outside every split (from the other end of the docs), about ``tokens``."""
        import gzip

        from benchmarks.kernel_docs import DOCS
        from ingest.corpus import Document

        used = set()
        for files in json.loads((self.work / "splits.json").read_text())["files"].values():
            used.update(files)
        extra, total = [], 0
        for path in sorted(DOCS.rglob("*.rst.gz"), reverse=True):
            rel = str(path.relative_to(DOCS))
            if rel in used:
                continue
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            n = len(lm.encode(text))
            if 200 < n < 6000:
                extra.append(Document(rel, text))
                total += n
            if total >= tokens:
                return extra
        return extra

    def ingest_speed(self) -> None:
        """Ingest into Edge and into the server (over REST and over gRPC), the same
        documents in turns of chunks, each target under its own domain; then dropped again.
        The server indexes new points in the background: the wait until it is green again
        counts as its index time, as Edge's optimize does."""
        from ingest.worker import IngestWorker
        from knn_store import PointFilter, load_language_model, open_store

        if self.saved("ingest_speed"):
            return
        settings = self.settings()
        lm = load_language_model(settings)
        docs = self.extra_documents(lm)
        targets = {
            "edge": settings,
            "server REST": self.settings("qdrant", prefer_grpc=False),
            "server gRPC": self.settings("qdrant", prefer_grpc=True),
        }
        stores = {label: open_store(s) for label, s in targets.items()}
        domains = {label: f"ingest-speed-{label.split()[-1].lower()}" for label in targets}
        before = {label: store.count() for label, store in stores.items()}
        results: dict[str, dict[str, Any]] = {label: {} for label in targets}
        # one chunk per order of the targets: each runs after each other as often (the
        # server's background indexing of one run's points lands in the next run)
        orders = list(itertools.permutations(targets))
        chunks = [docs[i :: len(orders)] for i in range(len(orders))]
        loads = []
        try:
            for c, chunk in enumerate(chunks):
                loads.append(os.getloadavg())
                for label in orders[c]:
                    store = stores[label]
                    worker = IngestWorker(
                        lm,
                        store,
                        domain=domains[label],
                        window=WINDOW,
                        stride=STRIDE,
                        batch_size=settings.batch_size,  # the CLI's default, 4
                        upsert_batch=settings.upsert_batch,
                        storage=store.meta.storage,  # type: ignore[union-attr]
                    )
                    report = worker.run(chunk)
                    index_seconds = report.index_seconds
                    if label != "edge":
                        index_seconds += self.wait_indexed()["seconds"]
                    _add(
                        results[label],
                        tokens=report.tokens,
                        seconds=report.seconds,
                        index_seconds=index_seconds,
                    )
                    results[label].setdefault("by_chunk_tokens_per_s", []).append(
                        report.tokens_per_second
                    )
                    print(
                        f"chunk {c}: {label}: {report.tokens_per_second:.0f} tok/s", file=sys.stderr
                    )
        finally:
            for label, store in stores.items():
                dropped = store.delete(PointFilter(domains=(domains[label],)))
                print(f"{label}: dropped {dropped:,} points", file=sys.stderr)
            if "server REST" in stores:  # the server's count after its own delete
                self.wait_indexed()
            after = {label: store.count() for label, store in stores.items()}
            for store in stores.values():
                store.close()
        assert after == before, (before, after)
        servers = [row for label, row in results.items() if label != "edge"]
        results["server, REST and gRPC together"] = {
            key: sum(row[key] for row in servers) for key in ("tokens", "seconds", "index_seconds")
        }
        edge = results["edge"]
        for row in results.values():
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["with_index_tokens_per_s"] = row["tokens"] / (row["seconds"] + row["index_seconds"])
            row["vs_edge"] = row["tokens_per_s"] / (edge["tokens"] / edge["seconds"])
            row["with_index_vs_edge"] = row["with_index_tokens_per_s"] / (
                edge["tokens"] / (edge["seconds"] + edge["index_seconds"])
            )
        self.save(
            "ingest_speed",
            {
                "points_before": before["edge"],
                "documents": len(docs),
                "batch_size": settings.batch_size,
                "targets": results,
                "load_averages": loads,
            },
        )

    def measured(self, names: list[str]) -> dict[str, Any]:
        """When each stage's result was written (UTC), and the commit the report ran on."""
        import datetime as dt

        def commit() -> str:
            done = subprocess.run(
                ["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"],
                capture_output=True,
                text=True,
            )
            return done.stdout.strip() or "unknown"

        written = {
            name: dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(
                timespec="minutes"
            )
            for name in names
            if (path := self.out / f"{name}.json").is_file()
        }
        return {"stages": written, "report_commit": commit()}

    def versions(self) -> dict[str, Any]:
        """``_versions`` of the stores the eval compares, opened anew."""
        from knn_store import load_language_model, open_session

        lm = load_language_model(self.settings())
        sessions = {label: open_session(s, lm=lm) for label, s in self.backends(threads=(1,))}
        try:
            return _versions(sessions)
        finally:
            for session in sessions.values():
                session.close()

    def report(self) -> None:
        """results.md, results.json (every figure) and server_vs_edge.png."""
        stages = {
            name: self.saved(name)
            for name in (
                "ingest",
                "tune",
                "push",
                "eval",
                "search",
                "rebuilt",
                "pinned",
                "ingest_speed",
            )
        }
        partial = self.saved("eval_partial")
        names = list(stages)
        if stages["eval"] is None and partial:  # an eval stopped between turns: its turns
            stages["eval"] = _eval_rows(partial, self.versions())
            names.append("eval_partial")
        data = relative(
            {"datastore_tokens": self.tokens, "k": K, "window": WINDOW, "stride": STRIDE}
            | {name: value for name, value in stages.items() if value is not None}
        )
        data["measured"] = self.measured(names)
        data["targets"] = _targets(data)
        self.results.mkdir(parents=True, exist_ok=True)
        (self.results / "results.json").write_text(json.dumps(data, indent=1) + "\n")
        lines = _tables(data)
        (self.results / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        if "eval" in data:
            _plot(data, self.results / "server_vs_edge.png")


# --- helpers ---------------------------------------------------------------------------------


def _add(acc: dict[str, Any], **values: float) -> dict[str, Any]:
    """Add ``values`` into the sums of ``acc`` (missing sums start at 0); returns acc."""
    for key, value in values.items():
        acc[key] = acc.get(key, 0) + value
    return acc


def _versions(sessions: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    server = next(s.store for label, s in sessions.items() if label != "edge")
    return {
        "cpus": os.cpu_count(),
        "qdrant_server": server.server_version,
        "qdrant_edge_py": version("qdrant-edge-py"),
        "qdrant_client": version("qdrant-client"),
        "torch": version("torch"),
        "policy": sessions["edge"].describe(),
        "search": sessions["edge"].knn_lm.search.describe(K, sessions["edge"].store.meta.storage),
        "points": sessions["edge"].store.count(),
    }


def _turns(ev: dict[str, Any]) -> str:
    """How many turns the eval ran, each over its own part of the test split."""
    done, planned = ev.get("turns", 3), ev.get("turns_planned", 3)
    if done >= planned:
        return f"{done} turns, each over a third of the split"
    return (
        f"{done} of {planned} turns, each over a third of the split (the eval stopped there; "
        "its stage resumes with the next turn)"
    )


def _run_name(backend: str, gate: bool, levers: bool) -> str:
    return backend + (", gate" if gate else "") + (", levers" if levers else "")


def _eval_rows(state: dict[str, Any], versions: dict[str, Any]) -> dict:
    """Per run: perplexity (and its difference from Edge's with the same gate setting),
    search ms/query, tokens/s and the ratio to the base LM of the same turns."""
    base = state["base"]
    base_tps = base["tokens"] / base["seconds"]
    rows = {}
    for name, run in state["runs"].items():
        rows[name] = {
            "backend": run["backend"],
            "gate": run["gate"],
            "levers": run.get("levers", False),
            "followed_share": run.get("followed", 0) / run["tokens"],
            "tokens": run["tokens"],
            "test_perplexity": math.exp(run["knn_nll"] / run["tokens"]),
            "base_perplexity": math.exp(run["base_nll"] / run["tokens"]),
            "search_ms_per_query": 1000 * run["search_seconds"] / max(run["searches"], 1),
            "skipped_share": 1 - run["searches"] / run["tokens"],
            "knn_tokens_per_s": run["tokens"] / run["seconds"],
            "base_tokens_per_s": base_tps,
            "ratio": run["tokens"] / run["seconds"] / base_tps,
            "seconds": run["seconds"],
            "search_seconds": run["search_seconds"],
            "lm_seconds": run["lm_seconds"],
        }
    for row in rows.values():
        edge = rows[_run_name("edge", row["gate"], row["levers"])]
        row["perplexity_vs_edge_percent"] = 100 * (
            row["test_perplexity"] / edge["test_perplexity"] - 1
        )
        row["search_vs_edge"] = row["search_ms_per_query"] / edge["search_ms_per_query"]
    return {
        "runs": rows,
        "turns": state["chunks_done"],
        "turns_planned": state.get("chunks_planned", 3),
        "base": base,
        "versions": versions,
        "load_averages": state.get("load_averages"),
    }


def _model_search(store: Any, queries: Any, options: Any) -> tuple[Any, float | None]:
    """The store's search through qdrant-client's models (a pydantic object per hit): the
    server path before the lean transport, kept here to measure against it."""
    from qdrant_client import models

    from knn_store.store.base import Hits

    quantization = None
    if store.meta.storage.quantization != "none":
        quantization = models.QuantizationSearchParams(
            ignore=options.exact,
            rescore=options.rescores(store.meta.storage),
            oversampling=options.oversampling,
        )
    params = models.SearchParams(
        hnsw_ef=options.ef(K), exact=options.exact, quantization=quantization
    )
    requests = [
        models.QueryRequest(
            query=row, limit=K, params=params, with_payload=False, with_vector=False
        )
        for row in queries.tolist()
    ]
    results = store._client.query_batch_points(store.name, requests=requests, timeout=60)
    ids = [[p.id for p in r.points] for r in results]
    return Hits.from_rows(ids, [[p.score for p in r.points] for r in results]), None


def _recall(found: Any, exact: Any) -> float:
    """Distance-based recall@k, as scale.py: the share of the exact k-th radius reached."""
    radius = exact[:, -1:]
    return float(((found <= radius * (1 + 1e-4)).sum(1) / exact.shape[1]).mean())


TARGETS = {
    "search": 1.25,  # server search ms/query (REST or gRPC) at most this times Edge's, k = 1024
    "knn_vs_base": 0.5,  # kNN-LM tok/s over the server at least this times the base LM's
    "knn_vs_base_own_core": 0.8,  # the same, the server on a core of its own
    "perplexity_percent": 0.1,  # server test perplexity within this of Edge's
    "push_points_per_s": 3 * 1217,  # 3x what push did through qdrant-client's models
    "server_ingest": 0.9,  # server ingest tok/s at least this times Edge's
}


def _target(target: str, run: str, value: float, met: bool) -> dict[str, Any]:
    return {"target": target, "run": run, "value": value, "met": met}


def _cause(target: str, run: str, data: dict[str, Any]) -> str:
    """What this run's own figures say about a missed target."""
    runs = data.get("eval", {}).get("runs", {})
    if "shared cores" in target and runs:
        row = runs[run]
        edge = runs[_run_name("edge", row["gate"], row.get("levers", False))]
        vs_edge = row["knn_tokens_per_s"] / edge["knn_tokens_per_s"]
        if vs_edge < 0.9:  # the server's path itself is slower
            pointers = (
                " (with the levers, pointer following's exact scoring of each position's "
                "followed points runs on the server, on the cores the LM uses)"
                if row.get("levers")
                else ""
            )
            return (
                f"over the server it ran at {vs_edge:.2f}x Edge's tokens/s: retrieval took "
                f"{row['search_ms_per_query']:.2f} ms per searched position against Edge's "
                f"{edge['search_ms_per_query']:.2f}{pointers}; Edge ran at {edge['ratio']:.2f}x"
            )
        return (
            f"Edge itself ran at {edge['ratio']:.2f}x beside the same "
            f"{edge['base_tokens_per_s']:.0f} tok/s LM: the kNN-LM's own work (k = {data['k']} "
            "neighbours mixed into the vocabulary's distribution per position) is the limit; "
            f"over the server it ran at {vs_edge:.2f}x Edge's tokens/s"
        )
    own = data.get("pinned", {}).get("own core", {}).get("runs", {})
    if "own core" in target and own:
        return (
            f"Edge on the LM's one core ran at {own['edge']['ratio']:.2f}x: what is left is the "
            "client's share of that core (decoding the hits, the kNN mixing), not the server"
        )
    recall = data.get("rebuilt", {}).get("recall", {})
    if "perplexity" in target and recall:
        server = recall.get("server REST", {})
        return (
            "under exact search every store returned the same neighbours (the recall table: "
            f"{100 * server.get('exact_same_tokens', 0):.1f}% the same tokens, largest squared-"
            f"distance difference {server.get('exact_max_sq_distance_difference', 0):.1g}): the "
            f"gap is the server's own HNSW graph (recall {server.get('recall', 0):.4f} against "
            f"Edge's {recall['edge']['recall']:.4f})"
        )
    if "perplexity" in target:
        return (
            "not explained by this run: the exact-search comparison (the `rebuilt` stage) was "
            "not run"
        )
    speed = data.get("ingest_speed", {}).get("targets", {})
    if "ingest" in target and "server REST" in speed:
        return (
            f"REST ran at {speed['server REST']['vs_edge']:.2f}x in the same turns; gRPC's "
            "slower upserts were not profiled (building its messages costs what the REST body "
            "costs: 41 and 43 ms per 1,024 points, measured apart)"
        )
    return ""


def _targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = [
        {**row, "cause": "" if row["met"] else _cause(row["target"], row["run"], data)}
        for row in _measured_targets(data)
    ]
    return out


def _measured_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    search = data.get("search", {})
    for label, row in search.items():
        if label.startswith("server") and "models" not in label:
            value = row["ms_per_query"] / search["edge"]["ms_per_query"]
            out.append(
                _target(
                    f"search <= {TARGETS['search']}x Edge's ms/query",
                    f"{label} (search alone)",
                    value,
                    value <= TARGETS["search"],
                )
            )
    for name, row in data.get("eval", {}).get("runs", {}).items():
        if row["backend"] == "edge":
            continue
        out.append(
            _target(
                f"kNN-LM >= {TARGETS['knn_vs_base']}x the base LM, shared cores",
                name,
                row["ratio"],
                row["ratio"] >= TARGETS["knn_vs_base"],
            )
        )
        out.append(
            _target(
                f"test perplexity within {TARGETS['perplexity_percent']}% of Edge's",
                name,
                row["perplexity_vs_edge_percent"],
                abs(row["perplexity_vs_edge_percent"]) <= TARGETS["perplexity_percent"],
            )
        )
    own = data.get("pinned", {}).get("own core")
    for label, row in (own or {}).get("runs", {}).items():
        if label != "edge":
            out.append(
                _target(
                    f"kNN-LM >= {TARGETS['knn_vs_base_own_core']}x the base LM, server on "
                    "its own core",
                    label,
                    row["ratio"],
                    row["ratio"] >= TARGETS["knn_vs_base_own_core"],
                )
            )
    push = data.get("push")
    if push:
        out.append(
            _target(
                f"push >= {TARGETS['push_points_per_s']:,} points/s",
                "knnlm push",
                push["points_per_s"],
                push["points_per_s"] >= TARGETS["push_points_per_s"],
            )
        )
    speed = data.get("ingest_speed", {}).get("targets", {})
    for label, row in speed.items():
        if label != "edge":
            out.append(
                _target(
                    f"server ingest >= {TARGETS['server_ingest']}x Edge's",
                    label,
                    row["vs_edge"],
                    row["vs_edge"] >= TARGETS["server_ingest"],
                )
            )
    return out


def _tables(data: dict[str, Any]) -> list[str]:
    lines = ["# knnlm with a Qdrant server as the store, beside Qdrant Edge", ""]
    measured = data.get("measured")
    if measured:
        times = sorted(measured["stages"].values())
        lines += [
            f"Measured {times[0]} to {times[-1]} (UTC); report written at commit "
            f"{measured['report_commit']}. Reproduce: the stages in `benchmarks/server.py`'s "
            "docstring, in order, against a server you started.",
            "",
        ]
    ev = data.get("eval")
    v = ev["versions"] if ev else {}
    if ev:
        lines += [
            f"SmolLM2-135M-Instruct, `ffn_input` keys, windows of {data['window']} with stride "
            f"{data['stride']}, the kernel-docs datastore of {v['points']:,} points "
            f"({data['datastore_tokens']:,} datastore tokens asked for), default storage "
            f"(float16 keys on disk, turbo4 codes in RAM, no rescore), k = {data['k']}, "
            f"{v['search']}; the tuned {v['policy']}. Qdrant server {v['qdrant_server']} on the "
            f"same machine over loopback; Qdrant Edge {v['qdrant_edge_py']}, qdrant-client "
            f"{v['qdrant_client']}, torch {v['torch']} on CPU, {v['cpus']} CPU cores, no GPU. "
            "The server and the benchmark share the cores.",
            "",
        ]
    push = data.get("push")
    if push:
        lines += [
            "## `knnlm push`: the Edge collection to the server",
            "",
            "| points | copy s | points/s | command wall s (with start-up) | server index s "
            "| points/s, wall + index |",
            "|---|---|---|---|---|---|",
            f"| {push['points']:,} | {push['copy_seconds']:.1f} | {push['points_per_s']:,.0f} | "
            f"{push['command_wall_seconds']:.1f} | {push['index']['seconds']:.1f} | "
            f"{push['points_per_s_with_index']:,.0f} |",
            "",
        ]
    if ev:
        base = ev["base"]
        lines += [
            "## Eval on the test split, every store in turns in one process",
            "",
            f"{next(iter(ev['runs'].values()))['tokens']:,} test tokens, "
            f"{_turns(ev)}. The order of the stores rotated each turn; the base LM ran "
            f"{base['passes']} times, before and after each turn's kNN-LM runs. Search "
            "ms/query is `search_seconds / queries` of `KnnLM.evaluate` (the search of a "
            "window batch overlaps the LM forward of the next).",
            "",
            "| store | gate (searches skipped) | levers (positions from pointers) | test ppl "
            "| vs Edge | search ms/query | vs Edge | base LM tok/s | kNN-LM tok/s "
            "| kNN-LM / base LM |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(
            ev["runs"].items(),
            key=lambda x: (x[1]["gate"], x[1].get("levers", False), x[0] != "edge"),
        )
        for _, row in order:
            gate = f"yes ({100 * row['skipped_share']:.0f}%)" if row["gate"] else "no"
            levers = f"yes ({100 * row['followed_share']:.0f}%)" if row.get("levers") else "no"
            lines.append(
                f"| {row['backend']} | {gate} | {levers} | {row['test_perplexity']:.4f} | "
                f"{row['perplexity_vs_edge_percent']:+.3f}% | {row['search_ms_per_query']:.2f} | "
                f"{row['search_vs_edge']:.2f}x | {row['base_tokens_per_s']:.0f} | "
                f"{row['knn_tokens_per_s']:.0f} | **{row['ratio']:.2f}x** |"
            )
        rebuilt = data.get("rebuilt")
        if rebuilt:
            edge = ev["runs"]["edge"]["test_perplexity"]
            change = 100 * (rebuilt["test_perplexity"] / edge - 1)
            lines += [
                "",
                "The same points in a second Edge collection, its HNSW graph built anew "
                f"(`knnlm rebuild`, same settings), no gate: test perplexity "
                f"{rebuilt['test_perplexity']:.4f} ({change:+.3f}% from Edge's). HNSW builds are "
                "not deterministic; turbo4 without rescoring ranks by the codes, so another "
                "graph finds other neighbours.",
            ]
            recall = rebuilt.get("recall")
            if recall:
                n = next(iter(recall.values()))["queries"]
                lines += [
                    "",
                    f"recall@k against an exact search (every 25th test query, {n} queries; "
                    "the share of the exact k-th radius reached), and each store's own exact "
                    "search against Edge's: its recall, the share of ranks holding the same "
                    "token, and the largest difference of a squared distance:",
                    "",
                    "| store | recall@k | its exact search | same tokens, exact "
                    "| max squared-distance difference, exact |",
                    "|---|---|---|---|---|",
                ]
                lines += [
                    f"| {label} | {row['recall']:.4f} | {row['exact_recall']:.4f} | "
                    f"{100 * row.get('exact_same_tokens', float('nan')):.2f}% | "
                    f"{row.get('exact_max_sq_distance_difference', float('nan')):.2e} |"
                    for label, row in recall.items()
                ]
        lines.append("")
    search = data.get("search")
    if search:
        lines += [
            "## Search alone (the test split's keys, no LM running, batches of 256)",
            "",
            "Each store in turns over three parts of the queries. The server rows go through "
            "knnlm's lean transport (one request per batch, the answer decoded into arrays); "
            "the `qdrant-client models` rows send the same batch through qdrant-client's "
            "models, the path before it. The server's own time is its answers' `time`.",
            "",
            "| store | ms/query | engine + transport + decoding | hits to [b, k] arrays "
            "| server's own time | top-k shared with Edge |",
            "|---|---|---|---|---|---|",
        ]
        for label, row in search.items():
            own = f"{row['server_ms_per_query']:.2f}" if "server_ms_per_query" in row else ""
            lines.append(
                f"| {label} | {row['ms_per_query']:.2f} | {row['call_ms_per_query']:.2f} | "
                f"{row['ids_ms_per_query']:.2f} | {own} | "
                f"{100 * row['same_neighbours_as_edge']:.1f}% |"
            )
        lines.append("")
    pinned = data.get("pinned")
    if pinned:
        lines += [
            "## A server on a core of its own (a remote server, modelled on this machine)",
            "",
            "A third of the test split, two turns. `own core`: the server pinned to core 0, "
            "this process (the LM with one torch thread, the kNN-LM's decoding, and Edge "
            "where Edge is the store) on core 1. `shared cores`: both on both cores.",
            "",
            "| layout | store | test ppl | search ms/query | base LM tok/s | kNN-LM tok/s "
            "| kNN-LM / base LM |",
            "|---|---|---|---|---|---|---|",
        ]
        for layout, block in pinned.items():
            for label, row in block["runs"].items():
                lines.append(
                    f"| {layout} | {label} | {row['test_perplexity']:.4f} | "
                    f"{row['search_ms_per_query']:.2f} | {block['base_tokens_per_s']:.0f} | "
                    f"{row['knn_tokens_per_s']:.0f} | **{row['ratio']:.2f}x** |"
                )
        lines.append("")
    speed = data.get("ingest_speed")
    if speed:
        t = speed["targets"]
        lines += [
            f"## Ingest, the same {speed['documents']} documents (outside every split) into "
            "each, in turns",
            "",
            f"{speed['batch_size']} windows per forward; written into the collection of "
            f"{speed['points_before']:,} points under a domain per target, then dropped again. "
            "Index time: Edge's optimize; the server's wait until it is green again (it "
            "indexes in the background, on the same cores, while the ingest runs).",
            "",
            "| target | tokens | ingest tok/s | vs Edge | with index, tok/s | vs Edge |",
            "|---|---|---|---|---|---|",
        ]
        for label, row in t.items():
            lines.append(
                f"| {label} | {row['tokens']:,} | {row['tokens_per_s']:.0f} | "
                f"**{row['vs_edge']:.2f}x** | {row['with_index_tokens_per_s']:.0f} | "
                f"{row['with_index_vs_edge']:.2f}x |"
            )
        lines.append("")
    if data["targets"]:
        lines += [
            "## Targets",
            "",
            "| target | run | measured | met | measured cause where missed |",
            "|---|---|---|---|---|",
        ]
        for row in data["targets"]:
            value = row["value"]
            if "perplexity" in row["target"]:
                shown = f"{value:+.3f}%"
            elif "points/s" in row["target"]:
                shown = f"{value:,.0f}"
            else:
                shown = f"{value:.2f}x"
            met = "yes" if row["met"] else "no"
            lines.append(
                f"| {row['target']} | {row['run']} | {shown} | {met} | {row.get('cause', '')} |"
            )
        lines.append("")
    return lines


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = data["eval"]
    labels = [name for name, row in ev["runs"].items() if not row["gate"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(labels))
    width = 0.38
    left.bar(
        [x - width / 2 for x in xs],
        [ev["runs"][n]["search_ms_per_query"] for n in labels],
        width,
        label="in eval (beside the LM)",
    )
    left.bar(
        [x + width / 2 for x in xs],
        [data["search"][n]["ms_per_query"] if "search" in data else 0 for n in labels],
        width,
        label="search alone",
    )
    left.set_xticks(list(xs), [n.replace(", ", "\n") for n in labels], fontsize=8)
    left.set_ylabel("ms per query (k = 1024)")
    left.set_title("search time by store")
    left.legend(fontsize=8)
    right.bar(list(xs), [ev["runs"][n]["knn_tokens_per_s"] for n in labels], color="C2")
    right.axhline(
        ev["runs"][labels[0]]["base_tokens_per_s"], color="k", linestyle="--", label="base LM"
    )
    right.set_xticks(list(xs), [n.replace(", ", "\n") for n in labels], fontsize=8)
    right.set_ylabel("eval tokens/s")
    right.set_title("kNN-LM eval throughput, no gate")
    right.legend(fontsize=8)
    points = ev["versions"]["points"]
    fig.suptitle(f"{points:,} points, SmolLM2-135M, {ev['versions']['cpus']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
