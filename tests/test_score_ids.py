"""``KnnStore.score_ids``, the engine-side scoring of followed pointers, against numpy brute
force on both embedded engines: distances to the named points only, the k nearest in
search order, missing ids and empty rows, and the original keys of a quantized collection."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from knn_store import CollectionMeta, PointBatch
from knn_store.store.base import NEXT_FIELD, KnnStore
from knn_store.store.client import QdrantClientStore
from knn_store.store.config import SearchOptions, StorageConfig
from knn_store.store.edge import EdgeStore
from knn_store.store.point_ids import document_hash, document_key, make_point_ids

DIM, N, VOCAB = 16, 300, 7


def _filled(kind: str, path: Path, quantization: str) -> tuple[KnnStore, list[str], np.ndarray]:
    """N points of one document, ids and keys [N, DIM]; keys far from the origin, so that
    binary codes (signs) rank them unlike their distances. Even points carry ``next``."""
    meta = CollectionMeta(
        model="tiny",
        model_fingerprint="abc",
        key_type="final",
        dim=DIM,
        vocab_size=VOCAB,
        tokenizer="t:1",
        storage=StorageConfig(quantization=quantization, indexing_threshold_kb=1),
    )
    if kind == "edge":
        store: KnnStore = EdgeStore(path / "c", create=True)
    else:
        store = QdrantClientStore.local(path / "local", collection="c", create=True)
    store.ensure_collection(meta)
    rng = np.random.default_rng(0)
    h = document_hash("dom", "text")
    ids = make_point_ids(h, np.arange(N), rng.integers(0, VOCAB, N))
    keys = (rng.standard_normal((N, DIM)) + 3.0).astype(np.float32)
    payloads = [{"domain": "dom", "doc": document_key(h), "offset": i} | _next(i) for i in range(N)]
    store.upsert(PointBatch(ids=ids, keys=keys, payloads=payloads))
    store.finalize()
    return store, ids, keys


def _next(i: int) -> dict[str, int]:
    return {NEXT_FIELD: i % VOCAB} if i % 2 == 0 else {}


def _reference(
    keys: np.ndarray, ids: list[str], query: np.ndarray, wanted: list[object], k: int
) -> tuple[list[str], np.ndarray, list[int]]:
    """The k nearest of the named points that exist (each once): ids, float64 d2, and
    their ``next`` values (-1 where absent)."""
    row_of = {pid: r for r, pid in enumerate(ids)}
    rows = sorted({row_of[str(w)] for w in wanted if str(w) in row_of})
    d2 = ((keys[rows].astype(np.float64) - query.astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d2, kind="stable")[:k]
    nexts = [_next(rows[o]).get(NEXT_FIELD, -1) for o in order]
    return [ids[rows[o]] for o in order], d2[order], nexts


@pytest.mark.parametrize(
    ("kind", "quantization"), [("edge", "none"), ("edge", "binary"), ("local", "none")]
)
def test_scores_equal_brute_force_over_the_named_points(
    kind: str, quantization: str, tmp_path: Path
) -> None:
    store, ids, keys = _filled(kind, tmp_path, quantization)
    absent = make_point_ids(document_hash("dom", "never stored"), np.arange(3), np.arange(3))
    rng = np.random.default_rng(1)
    k = 8
    pick = rng.permutation(N)
    wanted: list[list[object]] = [
        # fewer than k, a repeat, missing ids, and UUID objects as a search returns them
        [ids[pick[0]], absent[0], uuid.UUID(ids[pick[1]]), ids[pick[0]], ids[pick[2]]],
        [],  # no pointers: an empty row
        [ids[i] for i in pick[3:60]],  # more than k: the k nearest
        list(absent),  # none exists
        [uuid.UUID(ids[i]) for i in pick[60:75]],
    ]
    queries = (rng.standard_normal((len(wanted), DIM)) + 3.0).astype(np.float32)
    got, nexts = store.score_ids(queries, wanted, k=k)

    assert got.token_ids.shape == got.sq_distances.shape == (len(wanted), k)
    assert got.point_ids is not None and got.sq_distances.dtype == np.float32
    assert nexts.shape == (len(wanted), k) and nexts.dtype == np.int64
    for r, row in enumerate(wanted):
        ref_ids, ref_d2, ref_nexts = _reference(keys, ids, queries[r], row, k)
        n = len(ref_ids)
        assert [str(i) for i in got.point_ids[r, :n]] == ref_ids
        np.testing.assert_allclose(got.sq_distances[r, :n], ref_d2, rtol=1e-5)
        tokens = [int(i[-8:], 16) for i in ref_ids]  # the value is in the id
        assert got.token_ids[r, :n].tolist() == tokens
        assert nexts[r, :n].tolist() == ref_nexts and (nexts[r, n:] == -1).all()
        assert (got.token_ids[r, n:] == -1).all() and np.isinf(got.sq_distances[r, n:]).all()
        assert all(i is None for i in got.point_ids[r, n:])
    assert (got.token_ids[2] >= 0).all()  # the long row was cut to k

    # a point scored and searched has the same distance either way (the same arithmetic)
    searched = store.search(queries, k=k, options=SearchOptions(exact=True))
    assert searched.point_ids is not None
    everything, _ = store.score_ids(queries, [ids] * len(wanted), k=k)
    np.testing.assert_array_equal(everything.sq_distances, searched.sq_distances)
    assert everything.point_ids is not None
    assert everything.point_ids.tolist() == searched.point_ids.tolist()
    store.close()


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_nothing_to_score(kind: str, tmp_path: Path) -> None:
    store, ids, _ = _filled(kind, tmp_path, "none")
    empty, nexts = store.score_ids(np.zeros((2, DIM), np.float32), [[], []], k=3)
    assert (empty.token_ids == -1).all() and np.isinf(empty.sq_distances).all()
    assert nexts.shape == (2, 3) and (nexts == -1).all()
    none, _ = store.score_ids(np.zeros((0, DIM), np.float32), [], k=3)
    assert none.token_ids.shape == (0, 3)
    with pytest.raises(ValueError, match="rows of ids"):
        store.score_ids(np.zeros((2, DIM), np.float32), [ids[:2]], k=3)
    with pytest.raises(ValueError, match="positive"):
        store.score_ids(np.zeros((1, DIM), np.float32), [ids[:2]], k=0)
    store.close()


def test_next_values_follow_the_search_order() -> None:
    """Hits out of order, with a tie: the rows are put in search order (ascending, ties by
    token), and each hit's ``next`` moves with it."""
    from knn_store.store.base import Hits, _rows_from_hits

    ids = make_point_ids(document_hash("dom", "t"), np.arange(3), np.array([4, 3, 2]))
    found, nexts = _rows_from_hits(Hits.from_rows([ids], [[2.0, 1.0, 1.0]], [[10, 11, 12]]), k=4)
    assert found.token_ids.tolist() == [[2, 3, 4, -1]]
    assert found.sq_distances.tolist() == [[1.0, 1.0, 4.0, np.inf]]
    assert nexts.tolist() == [[12, 11, 10, -1]]
