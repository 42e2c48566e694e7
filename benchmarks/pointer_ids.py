"""What successor access and integer ids cost on Qdrant Edge (issue 16, part 1).

A synthetic collection of clustered 576-d points, stored twice: once with today's UUID ids
and once with 64-bit integer ids, both with the ``next`` payload field that pointer following
reads. Measured per query at k = 1024 (HNSW, ef = k), in batches like ``KnnLM`` sends:

- search without payload (today), with UUID ids and with integer ids: the integer ids'
  saving is the cost of building one ``uuid.UUID`` (or str) per hit plus parsing it;
- search that also returns the ``next`` field (what a design that reads it at every search
  would pay);
- one batched retrieve of n followed points by id, with their keys and ``next`` (what
  pointer following pays per step instead of a search).

Run:  python benchmarks/pointer_ids.py --points 50000   (writes benchmarks/results/pointers/)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from knn_store.store.base import Hits, neighbours_from_hits
from knn_store.store.point_ids import make_point_ids


def _config(dim: int) -> qe.EdgeConfig:
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Euclid),
        hnsw_config=qe.HnswIndexConfig(m=16, ef_construct=100, full_scan_threshold=10_000),
    )


def _build(path: Path, keys: np.ndarray, ids: list, nexts: np.ndarray) -> qe.EdgeShard:
    shard = qe.EdgeShard.create(str(path), _config(keys.shape[1]))
    for lo in range(0, len(keys), 2000):
        points = [
            qe.Point(pid, key, {"next": int(nx), "doc": "d"})
            for pid, key, nx in zip(
                ids[lo : lo + 2000], keys[lo : lo + 2000], nexts[lo : lo + 2000], strict=True
            )
        ]
        shard.update(qe.UpdateOperation.upsert_points(points))
    shard.optimize()
    return shard


def _search_ms(
    shard: qe.EdgeShard, queries: np.ndarray, k: int, payload: object, batch: int
) -> float:
    """ms per query of a batched search, including turning the hits into ``Neighbours``."""
    params = qe.SearchParams(hnsw_ef=k, exact=False)
    started = time.perf_counter()
    for lo in range(0, len(queries), batch):
        requests = [
            qe.QueryRequest(
                limit=k,
                query=qe.Query.Nearest(q),
                with_payload=payload,
                with_vector=False,
                params=params,
            )
            for q in queries[lo : lo + batch]
        ]
        hits = shard.query_batch(qe.QueryBatchRequest(requests))
        ids = [[p.id for p in row] for row in hits]
        scores = [[p.score for p in row] for row in hits]
        if isinstance(ids[0][0], int):  # integer ids: what ``neighbours_from_hits`` would do
            _int_neighbours(ids, scores, k)
        else:
            neighbours_from_hits(Hits.from_rows(ids, scores), k=k)
    return 1000 * (time.perf_counter() - started) / len(queries)


def _int_neighbours(ids: list[list[int]], scores: list[list[float]], k: int) -> tuple:
    """The same [b, k] arrays as ``neighbours_from_hits`` (values, squared distances, point
    ids), from [position | 16-bit token] integer ids: the fair comparison."""
    b = len(ids)
    flat = np.fromiter((i for row in ids for i in row), dtype=np.uint64)
    counts = np.fromiter((len(row) for row in ids), dtype=np.int64, count=b)
    mask = np.arange(k)[None, :] < counts[:, None]
    token_ids = np.full((b, k), -1, dtype=np.int64)
    sq = np.full((b, k), np.inf, dtype=np.float32)
    point_ids = np.full((b, k), None, dtype=object)
    token_ids[mask] = (flat & np.uint64(0xFFFF)).astype(np.int64)
    point_ids[mask] = [i for row in ids for i in row]
    d = np.fromiter((s for row in scores for s in row), dtype=np.float64)
    sq[mask] = (d * d).astype(np.float32)
    return token_ids, sq, point_ids


def _retrieve_ms(
    shard: qe.EdgeShard, ids: list, n: int, reps: int, rng: np.random.Generator
) -> float:
    """ms per batched retrieve of n points with their keys and the ``next`` field."""
    started = time.perf_counter()
    for _ in range(reps):
        pick = [ids[i] for i in rng.choice(len(ids), n, replace=False)]
        records = shard.retrieve(pick, ["next"], True)
        _ = np.asarray([r.vector for r in records], dtype=np.float32)
        _ = [r.payload["next"] for r in records]
    return 1000 * (time.perf_counter() - started) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pointers"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, args.dim)).astype(np.float32)
    keys = centres[rng.integers(0, 64, args.points)] + 0.5 * rng.normal(
        size=(args.points, args.dim)
    ).astype(np.float32)
    queries = keys[rng.choice(args.points, args.queries, replace=False)] + 0.1 * rng.normal(
        size=(args.queries, args.dim)
    ).astype(np.float32)
    tokens = rng.integers(0, 49_152, args.points)
    positions = np.arange(args.points)
    uuid_ids = make_point_ids(0x0123456789ABCDEF, positions, tokens)
    int_ids = [
        int(p) << 16 | int(t) for p, t in zip(positions, tokens, strict=True)
    ]  # [position | token]
    nexts = np.roll(tokens, -1)

    results: dict[str, float] = {
        "points": args.points,
        "top_k": args.top_k,
        "queries": args.queries,
    }
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        uuid_shard = _build(Path(tmp) / "uuid", keys, uuid_ids, nexts)
        int_shard = _build(Path(tmp) / "int", keys, int_ids, nexts)
        results["build_seconds"] = time.perf_counter() - started
        for shard in (uuid_shard, int_shard):  # warm the page cache and the index
            _search_ms(shard, queries[:64], args.top_k, False, args.batch)
        for rep in range(2):  # two alternating rounds, so a neighbour's load hits both alike
            results[f"uuid_search_ms_{rep}"] = _search_ms(
                uuid_shard, queries, args.top_k, False, args.batch
            )
            results[f"int_search_ms_{rep}"] = _search_ms(
                int_shard, queries, args.top_k, False, args.batch
            )
            results[f"uuid_search_next_payload_ms_{rep}"] = _search_ms(
                uuid_shard, queries, args.top_k, ["next"], args.batch
            )
        for n in (16, 128, 1024):
            results[f"retrieve_{n}_with_keys_ms"] = _retrieve_ms(uuid_shard, uuid_ids, n, 20, rng)
        uuid_shard.close()
        int_shard.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "id_costs.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
