"""Neighbours tied at the k-th distance (copies of one key, as repeated text makes) are taken
by token, whatever order the engine met them in: two collections of the same points written
in other orders, each engine, and every replica of a cluster answer the same k.

Before, each replica of a cluster's shard answered an exact search with the tied points it
held first, so an eval answered other numbers while a node restarted (3e-5 off).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from knn_store.store.base import TIE_LIMIT, CollectionMeta, PointBatch
from knn_store.store.config import SearchOptions, StorageConfig
from knn_store.store.point_ids import document_hash, make_point_ids

DIM, BASES, COPIES, VOCAB = 8, 12, 40, 30
META = CollectionMeta(
    "m",
    "f",
    "final",
    DIM,
    VOCAB,
    "t",
    storage=StorageConfig(quantization="none", datatype="float32"),
)


def _points(order: int = 0) -> PointBatch:
    """BASES keys, each stored COPIES times with other tokens: every distance ties 40 ways."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((BASES, DIM)).astype(np.float32)
    n = BASES * COPIES
    keys = base[np.arange(n) % BASES]
    tokens = rng.integers(0, VOCAB, n)
    ids = make_point_ids(document_hash("d", "t"), np.arange(n), tokens)
    payloads = [{"domain": "d", "doc": "t", "offset": i} for i in range(n)]
    index = np.random.default_rng(order).permutation(n) if order else np.arange(n)
    return PointBatch(
        ids=[ids[i] for i in index], keys=keys[index], payloads=[payloads[i] for i in index]
    )


def _reference(batch: PointBatch, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy: every point's squared distance, sorted by (distance, token), the first k."""
    from knn_store.store.point_ids import tokens_from_ids

    tokens = tokens_from_ids(batch.ids)
    keys = batch.keys.astype(np.float64)
    out_tokens, out_d2 = [], []
    for q in queries.astype(np.float64):
        d2 = ((keys - q) ** 2).sum(1).astype(np.float32)
        order = np.lexsort((tokens, d2))[:k]
        out_tokens.append(tokens[order])
        out_d2.append(d2[order])
    return np.array(out_tokens), np.array(out_d2)


def _queries() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (_points().keys[:5] + 0.05 * rng.standard_normal((5, DIM))).astype(np.float32)


@pytest.mark.parametrize("k", [30, 55, 100, 200])
def test_ties_at_the_kth_neighbour_are_taken_by_token(tmp_path: Path, k: int) -> None:
    """k = 30 cuts one group of 40 copies, 55 the second, 100 and 200 a third and a fifth:
    within any order of writing, on Edge and in local mode."""
    from knn_store.store.client import QdrantClientStore
    from knn_store.store.edge import EdgeStore

    queries = _queries()
    tokens, d2 = _reference(_points(), queries, k)
    for name, open_store in (
        ("edge", lambda o: EdgeStore(tmp_path / f"edge{o}")),
        ("local", lambda o: QdrantClientStore.local(tmp_path / f"local{o}", collection="c")),
    ):
        for order in (0, 1, 2):
            store = open_store(order)
            try:
                store.ensure_collection(META)
                store.upsert(_points(order))
                store.finalize()
                got = store.search(queries, k=k, options=SearchOptions(exact=True))
            finally:
                store.close()
            np.testing.assert_array_equal(got.token_ids, tokens, err_msg=f"{name} {order}")
            np.testing.assert_allclose(got.sq_distances, d2, rtol=1e-5, atol=1e-5)


def test_a_tie_longer_than_the_search_goes_is_cut_where_it_stops(tmp_path: Path) -> None:
    """A tie of more points than TIE_LIMIT x k: the search stops asking for more, and still
    returns k neighbours in ascending order."""
    from knn_store.store.edge import EdgeStore

    k = COPIES // (2 * TIE_LIMIT)
    assert k * TIE_LIMIT < COPIES
    store = EdgeStore(tmp_path / "edge")
    try:
        store.ensure_collection(META)
        store.upsert(_points())
        got = store.search(_queries(), k=k, options=SearchOptions(exact=True))
    finally:
        store.close()
    assert (got.token_ids >= 0).all() and got.token_ids.shape == (5, k)
    assert (np.diff(got.sq_distances, axis=1) >= 0).all()


@pytest.mark.server
@pytest.mark.slow
def test_every_replica_of_a_cluster_answers_the_same_k(qdrant_binary: Path, tmp_path: Path) -> None:
    """3 shards x 2 replicas, written through three nodes at once (so replicas hold their
    points in other orders): an exact search through each node, which prefers its own
    replicas, gives the numpy answer."""
    import dataclasses

    from knn_store.store.client import QdrantClientStore
    from tests.cluster import Cluster

    storage = dataclasses.replace(
        META.storage, shard_number=3, replication_factor=2, write_consistency_factor=2
    )
    meta = dataclasses.replace(META, storage=storage)
    cluster = Cluster.start(qdrant_binary, tmp_path / "cluster")
    stores = []
    try:
        stores = [
            QdrantClientStore.server(node.url, collection="ties", grpc_port=node.grpc_port)
            for node in cluster.nodes
        ]
        stores[0].ensure_collection(meta)
        for store in stores[1:]:
            store._read_collection()
        batch = _points(order=3)
        parts = [batch[i::3] for i in range(3)]  # every third point, through each node

        def write(i: int) -> None:
            for lo in range(0, len(parts[i]), 20):
                stores[i].upsert(parts[i][lo : lo + 20])

        writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        queries = _queries()
        for k in (30, 55, 100):
            tokens, d2 = _reference(_points(), queries, k)
            for i, store in enumerate(stores):
                got = store.search(queries, k=k, options=SearchOptions(exact=True))
                np.testing.assert_array_equal(got.token_ids, tokens, err_msg=f"node {i}, k {k}")
                np.testing.assert_allclose(got.sq_distances, d2, rtol=1e-5, atol=1e-5)
    finally:
        for store in stores:
            store.close()
        cluster.stop()
