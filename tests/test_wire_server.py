"""The lean transport against a real server: over REST and gRPC, for every storage setting,
with and without a domain filter, and for pointer scoring, it returns the same ids in the same
order as qdrant-client's own model path, with the same scores; and its upserts write the same
points as the client's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from qdrant_client import models

from knn_store.store.base import NEXT_FIELD, Hits, PointFilter
from knn_store.store.client import QdrantClientStore
from knn_store.store.config import SearchOptions, StorageConfig
from tests.qdrant_server import Server
from tests.test_server import META, STORAGES, _name, _points, _store
from tests.test_wire import _client_requests

pytestmark = pytest.mark.server

K = 24


@pytest.fixture(params=["REST", "gRPC"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def _model_path(store: QdrantClientStore, requests: list[models.QueryRequest]) -> Hits:
    """The same batch through qdrant-client's models: the reference."""
    results = store._client.query_batch_points(store.name, requests=requests)
    return Hits.from_rows(
        [[str(p.id) for p in r.points] for r in results],
        [[p.score for p in r.points] for r in results],
        [[(p.payload or {}).get(NEXT_FIELD, -1) for p in r.points] for r in results],
    )


def _same_hits(lean: Hits, reference: Hits, *, nexts: bool = False) -> None:
    np.testing.assert_array_equal(lean.counts, reference.counts)
    assert [str(i) for i in lean.ids] == reference.ids  # the same ids, in the same order
    np.testing.assert_allclose(lean.scores, reference.scores, rtol=1e-6, atol=1e-6)
    if nexts:
        assert lean.nexts is not None and reference.nexts is not None
        np.testing.assert_array_equal(lean.nexts, reference.nexts)


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: s.describe())
def test_lean_searches_equal_the_model_path(
    qdrant_server: Server, storage: StorageConfig, transport: str
) -> None:
    from knn_store.store.wire import SearchSpec

    keys, _, batch = _points()
    store = _store(qdrant_server, _name(), grpc=transport == "gRPC")
    assert store.wire is not None and store.wire.name == transport
    try:
        store.ensure_collection(dataclasses.replace(META, storage=storage))
        store.upsert(batch)  # through the lean path too
        store.finalize()
        queries = keys[:12] + 0.05
        for options in (SearchOptions(), SearchOptions(exact=True), SearchOptions(rescore=True)):
            for flt in (PointFilter(), PointFilter(domains=("b",))):
                lean = store._search(queries, k=K, options=options, filter=flt)
                quantized = storage.quantization != "none"
                spec = SearchSpec(
                    limits=[K] * len(queries),
                    hnsw_ef=options.ef(K),
                    exact=options.exact,
                    quantization=(options.exact, options.rescores(storage), options.oversampling)
                    if quantized
                    else None,
                    filter=flt,
                )
                _same_hits(lean, _model_path(store, _client_requests(queries, spec)))
                assert lean.counts.min() == K
        store.search_threads = 1  # one request for the batch
        whole = store._search(queries, k=K, options=SearchOptions(), filter=PointFilter())
        store.search_threads = 3  # the batch split over concurrent requests: the same hits
        _same_hits(
            store._search(queries, k=K, options=SearchOptions(), filter=PointFilter()), whole
        )
    finally:
        store.drop()
        store.close()


def test_lean_pointer_scoring_equals_the_model_path(qdrant_server: Server, transport: str) -> None:
    from knn_store.store.wire import SearchSpec

    keys, _, batch = _points(seed=3)
    for i, payload in enumerate(batch.payloads):
        if i % 5:
            payload[NEXT_FIELD] = i + 1000  # some points have no successor field
    storage = StorageConfig(quantization="int8", datatype="float16")
    store = _store(qdrant_server, _name(), grpc=transport == "gRPC")
    try:
        store.ensure_collection(dataclasses.replace(META, storage=storage))
        store.upsert(batch)
        store.finalize()
        rng = np.random.default_rng(0)
        rows = [list(rng.choice(batch.ids, size=int(n), replace=False)) for n in (1, 7, 40, 3)]
        rows[2].append("00000000-0000-0000-0000-000000000001")  # a point that does not exist
        queries = keys[:4] + 0.1
        lean = store._score_ids(queries, rows, k=K)
        spec = SearchSpec(
            limits=[min(K, len(r)) for r in rows],
            exact=True,
            quantization=(True, None, None),
            ids=rows,
            with_next=True,
        )
        _same_hits(lean, _model_path(store, _client_requests(queries, spec)), nexts=True)
        assert lean.counts.tolist() == [1, 7, K, 3]
    finally:
        store.drop()
        store.close()


def test_lean_upserts_write_what_the_client_writes(qdrant_server: Server, transport: str) -> None:
    """The same points upserted through the lean path and through qdrant-client's models read
    back equal: ids, keys and payloads."""
    _, _, batch = _points(n=50, seed=4)
    lean = _store(qdrant_server, _name(), grpc=transport == "gRPC")
    client = _store(qdrant_server, _name())
    try:
        for store in (lean, client):
            store.ensure_collection(META)
        lean.upsert(batch)
        client._client.upsert(
            client.name,
            points=models.Batch(
                ids=batch.ids, vectors=batch.keys.tolist(), payloads=batch.payloads
            ),
            wait=True,
        )
        written = [
            {p.id: p for p in store.retrieve(batch.ids, with_keys=True, with_payload=True).values()}
            for store in (lean, client)
        ]
        assert set(written[0]) == set(written[1]) == set(batch.ids)
        for pid in batch.ids:
            np.testing.assert_array_equal(written[0][pid].key, written[1][pid].key)
            assert written[0][pid].payload == written[1][pid].payload
    finally:
        for store in (lean, client):
            store.drop()
            store.close()
