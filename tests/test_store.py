"""Every Qdrant engine against a numpy brute force: Edge, qdrant-client's local mode, and a
real server over REST and over gRPC (``QDRANT_URL``, or a ``qdrant`` on PATH; see
``tests/qdrant_server.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from knn_store import (
    CollectionMeta,
    CollectionMissing,
    DimensionMismatch,
    PointBatch,
    StoreError,
    StoreUnavailable,
)
from knn_store.store.base import KnnStore, PointFilter
from knn_store.store.client import QdrantClientStore
from knn_store.store.config import SearchOptions
from knn_store.store.edge import EdgeStore
from knn_store.store.point_ids import document_hash, document_key, make_point_ids, tokens_from_ids
from tests.qdrant_server import Server
from tests.reference import brute_force_knn

DIM, N, VOCAB = 16, 600, 70
META = CollectionMeta(
    model="tiny",
    model_fingerprint="abc",
    key_type="final",
    dim=DIM,
    vocab_size=VOCAB,
    tokenizer="t:1",
)

SERVERS = [
    pytest.param("server-rest", marks=pytest.mark.server),
    pytest.param("server-grpc", marks=pytest.mark.server),
]
BACKENDS = ["edge", "local", *SERVERS]


def _open(
    kind: str,
    tmp_path: Path,
    name: str = "c",
    create: bool = True,
    server: Server | None = None,
) -> KnnStore:
    if kind == "edge":
        return EdgeStore(tmp_path / name, create=create)
    if kind == "local":
        return QdrantClientStore.local(tmp_path / "local", collection=name, create=create)
    assert server is not None, "server kinds need the qdrant_server fixture"
    return QdrantClientStore.server(
        server.url,
        # unique per test (tmp_path is), the same when a test reopens it
        collection=f"knnlm-test-{abs(hash(str(tmp_path))):x}-{name}",
        api_key=server.api_key,
        prefer_grpc=kind == "server-grpc",
        grpc_port=server.grpc_port,
        ca_cert=server.ca_cert,
        create=create,
    )


def _server_for(kind: str, request: pytest.FixtureRequest) -> Server | None:
    return request.getfixturevalue("qdrant_server") if kind.startswith("server") else None


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, PointBatch]:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((N, DIM)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, N)
    h = document_hash("dom", "text")
    ids = make_point_ids(h, np.arange(N), tokens)
    payloads = [
        {"domain": "a" if i < N // 2 else "b", "doc": document_key(h), "source": "s", "offset": i}
        for i in range(N)
    ]
    return keys, tokens, PointBatch(ids=ids, keys=keys, payloads=payloads)


@pytest.fixture(params=BACKENDS)
def filled(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[KnnStore, np.ndarray, np.ndarray]]:
    keys, tokens, batch = _data()
    store = _open(request.param, tmp_path, server=_server_for(request.param, request))
    store.ensure_collection(META)
    store.upsert(batch)
    store.finalize()
    yield store, keys, tokens
    if request.param.startswith("server"):  # leave the real server as we found it
        store.drop()
    store.close()


@pytest.mark.parametrize("exact", [True, False])
def test_search_matches_brute_force(filled, exact: bool) -> None:
    store, keys, tokens = filled
    rng = np.random.default_rng(5)
    queries = keys[:20] + 0.05 * rng.standard_normal((20, DIM)).astype(np.float32)
    got = store.search(queries, k=10, options=SearchOptions(exact=exact, hnsw_ef=64))
    idx, d2 = brute_force_knn(keys, queries, 10)
    np.testing.assert_allclose(got.sq_distances, d2, rtol=1e-4, atol=1e-4)  # squared, not plain L2
    np.testing.assert_array_equal(got.token_ids, tokens[idx])


def test_fewer_points_than_k_are_padded(filled) -> None:
    store, keys, _ = filled
    got = store.search(keys[:2], k=N + 10, options=SearchOptions(exact=True, hnsw_ef=10))
    assert got.token_ids.shape == (2, N + 10)
    assert (got.token_ids[:, N:] == -1).all() and np.isinf(got.sq_distances[:, N:]).all()
    assert (got.token_ids[:, :N] >= 0).all()


def test_domain_filter_and_counts(filled) -> None:
    store, keys, tokens = filled
    assert store.count() == N
    assert store.domains() == {"a": N // 2, "b": N // 2}
    got = store.search(
        keys[:5],
        k=5,
        options=SearchOptions(exact=True, hnsw_ef=10),
        filter=PointFilter(domains=("b",)),
    )
    idx, _ = brute_force_knn(keys[N // 2 :], keys[:5], 5)
    np.testing.assert_array_equal(got.token_ids, tokens[N // 2 :][idx])


def test_upserting_the_same_points_again_adds_nothing(filled) -> None:
    store, _, _ = filled
    _, _, batch = _data()
    store.upsert(batch)
    assert store.count() == N
    assert store.count(PointFilter(docs=(document_key(document_hash("dom", "text")),))) == N
    assert store.count(PointFilter(docs=("0000000000000000",))) == 0


def test_meta_mismatch_names_both_sides(filled) -> None:
    store, _, _ = filled
    other_key = CollectionMeta(**{**META.to_dict(), "key_type": "ffn_input"})
    with pytest.raises(DimensionMismatch, match=r"final.*ffn_input"):
        store.ensure_collection(other_key)
    other_model = CollectionMeta(**{**META.to_dict(), "model": "big", "model_fingerprint": "zz"})
    with pytest.raises(DimensionMismatch, match=r"'tiny'.*'big'"):
        store.ensure_collection(other_model)
    store.ensure_collection(META)  # the same meta is accepted


@pytest.mark.parametrize("kind", BACKENDS)
def test_reopen_keeps_points_and_meta(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = _server_for(kind, request)
    _, _, batch = _data()
    store = _open(kind, tmp_path, server=server)
    store.ensure_collection(META)
    store.upsert(batch)
    store.close()
    again = _open(kind, tmp_path, create=False, server=server)
    assert again.meta == META
    assert again.count() == N
    if server is not None:
        again.drop()
    again.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_missing_collection(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with pytest.raises(CollectionMissing, match="knnlm ingest"):
        _open(kind, tmp_path, name="nope", create=False, server=_server_for(kind, request))


def test_backends_agree(tmp_path: Path) -> None:
    """The congruence check: the same queries on both engines give the same neighbours."""
    keys, _, batch = _data(seed=9)
    stores = [_open("edge", tmp_path), _open("local", tmp_path)]
    results = []
    for store in stores:
        store.ensure_collection(META)
        store.upsert(batch)
        store.finalize()
        results.append(
            store.search(keys[:30] + 0.01, k=25, options=SearchOptions(exact=True, hnsw_ef=50))
        )
        store.close()
    np.testing.assert_array_equal(results[0].token_ids, results[1].token_ids)
    np.testing.assert_allclose(results[0].sq_distances, results[1].sq_distances, rtol=1e-4)


def test_point_ids_round_trip() -> None:
    tokens = np.array([0, 1, 49151, 2**32 - 1])
    ids = make_point_ids(document_hash("d", "t"), np.array([0, 7, 2**20, 2**32 - 1]), tokens)
    assert len(set(ids)) == 4
    np.testing.assert_array_equal(tokens_from_ids(ids), tokens)
    np.testing.assert_array_equal(tokens_from_ids([uuid.UUID(i) for i in ids]), tokens)
    assert ids == make_point_ids(
        document_hash("d", "t"), np.array([0, 7, 2**20, 2**32 - 1]), tokens
    )
    assert document_hash("d", "t") != document_hash("e", "t")
    assert document_hash("ab", "c") != document_hash("a", "bc")
    with pytest.raises(ValueError, match="32 bits"):
        make_point_ids(1, np.array([0]), np.array([2**32]))


def test_edge_recovers_from_a_creation_cut_short(tmp_path: Path) -> None:
    """A shard without meta.json (killed while creating) is redone when empty, refused if not."""
    store = EdgeStore(tmp_path / "c")
    store.ensure_collection(META)
    store.close()
    (tmp_path / "c" / "meta.json").unlink()
    again = EdgeStore(tmp_path / "c")
    assert again.meta is None
    again.ensure_collection(META)
    _, _, batch = _data()
    again.upsert(batch)
    again.close()
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(StoreError, match="holds 600 points"):
        EdgeStore(tmp_path / "c").ensure_collection(META)


def test_edge_engine_failures_become_store_errors(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "c")
    store.ensure_collection(META)
    bad = PointBatch(
        ids=[str(uuid.UUID(int=1))], keys=np.zeros((1, DIM + 1), np.float32), payloads=[{}]
    )
    with pytest.raises(StoreError, match="failed to write points"):
        store.upsert(bad)
    with pytest.raises(StoreError, match="failed to search"):
        store.search(
            np.zeros((1, DIM + 1), np.float32), k=3, options=SearchOptions(exact=True, hnsw_ef=3)
        )
    store.close()


def test_server_errors_are_told_apart_from_an_unreachable_server(tmp_path: Path) -> None:
    store = QdrantClientStore.local(None, collection="c")
    store.ensure_collection(META)
    bad = PointBatch(
        ids=[str(uuid.UUID(int=1))], keys=np.zeros((1, DIM + 1), np.float32), payloads=[{}]
    )
    with pytest.raises(StoreError, match="failed to upsert") as info:
        store.upsert(bad)
    assert not isinstance(info.value, StoreUnavailable)  # it answered: the request was wrong
    with pytest.raises(StoreUnavailable, match="cannot reach Qdrant"):
        QdrantClientStore.server("http://127.0.0.1:9", collection="c", timeout=2, retries=0)


def test_collection_from_a_newer_knnlm_is_refused(tmp_path: Path) -> None:
    import json

    store = EdgeStore(tmp_path / "c")
    store.ensure_collection(META)
    store.close()
    meta_file = tmp_path / "c" / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "format_version": 99}))
    with pytest.raises(StoreError, match=r"format 99.*upgrade knnlm"):
        EdgeStore(tmp_path / "c", create=False)


def test_point_batches_slice_and_concat() -> None:
    _, _, batch = _data()
    head, tail = batch[:100], batch[100:]
    assert (len(head), len(tail)) == (100, N - 100)
    joined = PointBatch.concat([head, tail])
    assert joined.ids == batch.ids and joined.payloads == batch.payloads
    np.testing.assert_array_equal(joined.keys, batch.keys)


def test_points_read_back_by_id_with_keys_and_payloads(filled) -> None:
    store, keys, _ = filled
    got = store.search(keys[:3], k=4, options=SearchOptions(exact=True, hnsw_ef=10))
    assert got.point_ids is not None and got.point_ids.shape == (3, 4)
    nearest = list(got.point_ids[:, 0])
    points = store.retrieve(nearest, with_keys=True, with_payload=True)
    for row, pid in enumerate(nearest):
        point = points[str(pid)]
        np.testing.assert_allclose(point.key, keys[row], rtol=1e-6)  # each query is a stored key
        assert point.payload is not None and point.payload["offset"] == row
    bare = store.retrieve(nearest[:1], with_keys=False, with_payload=False)
    assert bare[str(nearest[0])].key is None and bare[str(nearest[0])].payload is None


@pytest.mark.parametrize("kind", BACKENDS)
def test_policy_is_kept_with_the_collection(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = _server_for(kind, request)
    store = _open(kind, tmp_path, server=server)
    store.ensure_collection(META)
    assert store.load_policy() is None
    policy = {"policy": {"kind": "fixed", "lambda": 0.3}, "temperature": 2.0}
    store.save_policy(policy)
    store.save_policy({**policy, "temperature": 3.0})  # replaces, never appends
    assert store.load_policy() == {**policy, "temperature": 3.0}
    store.close()
    again = _open(kind, tmp_path, create=False, server=server)
    assert again.load_policy() == {**policy, "temperature": 3.0}
    assert again.meta == META  # the collection's own record is untouched
    if server is not None:
        again.drop()
    again.close()


def test_hits_out_of_order_come_back_ascending() -> None:
    """Binary quantization without rescoring returns scores in no particular order."""
    from knn_store.store.base import Hits, neighbours_from_hits

    ids = make_point_ids(document_hash("d", "t"), np.arange(3), np.array([5, 6, 7]))
    got = neighbours_from_hits(Hits.from_rows([ids], [[3.0, 1.0, 2.0]]), k=4)
    np.testing.assert_array_equal(got.sq_distances[0], [1.0, 4.0, 9.0, np.inf])
    np.testing.assert_array_equal(got.token_ids[0], [6, 7, 5, -1])
    assert got.point_ids is not None and got.point_ids[0, 0] == ids[1]


def test_two_processes_creating_one_edge_collection_race_cleanly(tmp_path: Path) -> None:
    """The engine lets two processes create one shard at once (both would write to it);
    the collection's lock lets one in and tells the other why not, in one line."""
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from knn_store.store.edge import EdgeStore\n"
        "from tests.test_store import META\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: pass\n"
        "try:\n"
        "    store = EdgeStore(sys.argv[1]); store.ensure_collection(META)\n"
        "    print('created', flush=True); time.sleep(2); store.close()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc, flush=True)\n"
    )
    root = Path(__file__).resolve().parent.parent
    start = str(time.time() + 4)  # both past their imports, then off at once
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "c"), start],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    lines = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert lines[0] == "StoreLocked " + (
        f"collection 'c' in {tmp_path} is in use by another process (another knnlm "
        "command?); wait for it to finish"
    ), lines
    assert lines[1] == "created", lines
    with EdgeStore(tmp_path / "c", create=False) as store:
        assert store.meta == META
