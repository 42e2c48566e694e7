"""What one followed position costs next to a search, on Qdrant Edge (issue 16).

One synthetic collection with successor links (every point carries ``next``), built in a
temporary folder: documents whose keys are random walks (a successor lies near its
predecessor, as LM keys do), values from a small alphabet so that many points share one.
Each position follows P pointers (points of the collection), half of them with the token
that came as their value. Measured at k = 1024 with one search thread, in batches of b = 1
and b = 4 positions (ms per call, median over interleaved rounds, so load from other
processes hits every row alike):

- a followed position with today's code: ``pointers.pointer_neighbours`` (the engine scores
  the pointers against the position's query, ``KnnStore.score_ids``, reading ``next`` with
  them) plus ``pointers.follow`` (the successors of the matches, no lookup), and each part;
- reading the P pointers' keys and ``next`` into Python with one ``KnnStore.retrieve``:
  what a followed step paid before the engine scored pointers (it scored them in numpy);
- one search: HNSW (ef = k) and exact (full scan).

Run:  python benchmarks/followed_cost.py   (writes benchmarks/results/pointers/followed_cost.*)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.paths import relative  # noqa: E402
from knn_store.pointers import Pointers, follow, pointer_neighbours  # noqa: E402
from knn_store.store.base import NEXT_FIELD, CollectionMeta, PointBatch  # noqa: E402
from knn_store.store.config import SearchOptions  # noqa: E402
from knn_store.store.edge import EdgeStore  # noqa: E402
from knn_store.store.point_ids import document_hash, document_key, make_point_ids  # noqa: E402

K = 1024
BATCHES = (1, 4)
DOCS = 30
VALUES = 64  # distinct values (next tokens): ~points / 64 points share each one
MATCH = 0.5  # share of a position's pointers whose value is the token that came
WRITE_BATCH = 1000

ROWS = (  # (key, label) in table order
    ("step", "followed position: score + follow (today)"),
    ("score", "  score: `pointer_neighbours` (`score_ids`, reads `next`)"),
    ("follow", "  follow: successors of the matches (no lookup)"),
    ("retrieve", "read the pointers' keys + `next` (`retrieve`, before)"),
    ("search_hnsw", "search, HNSW ef = k"),
    ("search_exact", "search, exact"),
)


class Collection:
    """The synthetic collection, and what it was built from (to pick pointers with)."""

    def __init__(self, path: Path, *, points: int, dim: int, rng: np.random.Generator) -> None:
        per = points // DOCS
        meta = CollectionMeta(
            model="synthetic",
            model_fingerprint="synthetic",
            key_type="final",
            dim=dim,
            vocab_size=49_152,
            tokenizer="synthetic:1",
            successors=True,
        )
        self.store = EdgeStore(path, create=True, search_threads=1)
        self.store.ensure_collection(meta)
        ids: list[str] = []
        keys, values, nexts = [], [], []
        for d in range(DOCS):
            doc = document_hash("synthetic", f"document {d}")
            tokens = rng.integers(0, VALUES, per)  # [per], each point's value
            walk = np.cumsum(rng.standard_normal((per, dim), dtype=np.float32) * 0.3, axis=0)
            walk += rng.standard_normal(dim, dtype=np.float32) * 5  # [per, dim]
            doc_ids = make_point_ids(doc, np.arange(per), tokens)
            doc_next = np.append(tokens[1:], -1)  # [per], the successor's value; none last
            for lo in range(0, per, WRITE_BATCH):
                hi = min(lo + WRITE_BATCH, per)
                payloads = [
                    {
                        "domain": "synthetic",
                        "doc": document_key(doc),
                        "offset": i,
                        NEXT_FIELD: int(doc_next[i]),
                        "context": f"synthetic context of position {i} " * 3,
                    }
                    for i in range(lo, hi)
                ]
                self.store.upsert(PointBatch(doc_ids[lo:hi], walk[lo:hi], payloads))
            ids += doc_ids
            keys.append(walk)
            values.append(tokens)
            nexts.append(doc_next)
        self.store.finalize()
        self.ids = ids  # [n]
        self.keys = np.concatenate(keys)  # float32 [n, dim]
        self.values = np.concatenate(values)  # int64 [n]
        self.nexts = np.concatenate(nexts)  # int64 [n]

    def pick(
        self, b: int, pointers: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[Pointers], np.ndarray, list[list[str]]]:
        """b positions to follow: their queries float32 [b, dim], P pointers each (all with
        a successor; MATCH of them with the target as value), the targets int64 [b], and
        the successor ids ``follow`` must name per row."""
        matching = int(pointers * MATCH)
        linked = self.nexts >= 0  # [n]
        targets = rng.integers(0, VALUES, b)  # [b]
        queries, rows, successors = [], [], []
        for t in targets:
            hit = np.flatnonzero(linked & (self.values == t))
            miss = np.flatnonzero(linked & (self.values != t))
            if len(hit) < matching or len(miss) < pointers - matching:
                raise SystemExit(f"too few points for {pointers} pointers: raise --points")
            chosen = np.concatenate(
                [
                    rng.choice(hit, matching, replace=False),
                    rng.choice(miss, pointers - matching, replace=False),
                ]
            )  # [P], indexes into the collection
            # the position's query: near one of its pointers, as a followed text's key is
            queries.append(self.keys[chosen[0]] + rng.standard_normal(self.keys.shape[1]) * 0.3)
            rows.append(
                Pointers(position=0, ids=[self.ids[i] for i in chosen], values=self.values[chosen])
            )
            successors.append(sorted(self.ids[i + 1] for i in chosen[:matching]))
        return np.asarray(queries, dtype=np.float32), rows, targets, successors


def calls(
    store: EdgeStore,
    queries: np.ndarray,
    rows: list[Pointers],
    targets: np.ndarray,
    successors: list[list[str]],
) -> dict[str, Callable[[], Any]]:
    """The measured calls for one batch, each checked once for what it returns."""
    b = len(rows)
    positions = np.zeros(b, dtype=np.int64)

    def score() -> Any:
        return pointer_neighbours(store, queries, rows, k=K)

    found, nexts = score()
    assert found.point_ids is not None
    assert ((found.token_ids >= 0).sum(axis=1) == [len(p) for p in rows]).all()

    def follow_only() -> list[Pointers]:
        return follow(
            store,
            positions=positions,
            point_ids=found.point_ids,
            token_ids=found.token_ids,
            nexts=nexts,
            targets=targets,
        )

    def step() -> list[Pointers]:
        near, near_next = pointer_neighbours(store, queries, rows, k=K)
        return follow(
            store,
            positions=positions,
            point_ids=near.point_ids,
            token_ids=near.token_ids,
            nexts=near_next,
            targets=targets,
        )

    assert [sorted(p.ids) for p in step()] == successors
    every = [i for p in rows for i in p.ids]

    def retrieve() -> Any:
        return store.retrieve(every, with_keys=True, with_payload=[NEXT_FIELD])

    assert len(retrieve()) == len(set(every))
    exact = SearchOptions(exact=True)
    return {
        "step": step,
        "score": score,
        "follow": follow_only,
        "retrieve": retrieve,
        "search_hnsw": lambda: store.search(queries, k=K),
        "search_exact": lambda: store.search(queries, k=K, options=exact),
    }


def table(results: dict[str, Any]) -> str:
    b1, b4 = (results["median_ms"][str(b)] for b in BATCHES)
    lines = [
        f"{results['points']} points, {results['dim']}-d, k = {K}, {results['pointers']} "
        f"pointers a position ({MATCH:.0%} match), one search thread; ms, median of "
        f"{results['rounds']} interleaved rounds",
        "",
        "| | b = 1 | b = 4 | b = 4, per position |",
        "|---|---:|---:|---:|",
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | {b1[key]:.3f} | {b4[key]:.3f} | {b4[key] / 4:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=30_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--pointers", type=int, default=300, help="pointers a position (P)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pointers")
    args = parser.parse_args()
    if args.points < DOCS * 2 or not 2 <= args.pointers <= K or args.rounds < 1:
        parser.error(f"need --points >= {DOCS * 2}, 2 <= --pointers <= {K}, --rounds >= 1")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        coll = Collection(Path(tmp) / "followed", points=args.points, dim=args.dim, rng=rng)
        build_seconds = time.perf_counter() - started
        try:
            batches = {b: calls(coll.store, *coll.pick(b, args.pointers, rng)) for b in BATCHES}
            times: dict[int, dict[str, list[float]]] = {
                b: {name: [] for name in fns} for b, fns in batches.items()
            }
            for round_ in range(-1, args.rounds):  # round -1 warms up and is not kept
                for b, fns in batches.items():
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        if round_ >= 0:
                            times[b][name].append(1000 * (time.perf_counter() - t0))
        finally:
            coll.store.close()

    def quantiles(q: float) -> dict[str, dict[str, float]]:
        return {
            str(b): {name: float(np.quantile(xs, q)) for name, xs in by_name.items()}
            for b, by_name in times.items()
        }

    results = {
        "points": DOCS * (args.points // DOCS),
        "dim": args.dim,
        "documents": DOCS,
        "values": VALUES,
        "top_k": K,
        "pointers": args.pointers,
        "match_share": MATCH,
        "rounds": args.rounds,
        "search_threads": 1,
        "build_seconds": build_seconds,
        "median_ms": quantiles(0.5),
        "p25_ms": quantiles(0.25),
        "p75_ms": quantiles(0.75),
        "settings": relative({k: str(v) for k, v in vars(args).items()}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "followed_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "followed_cost.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
