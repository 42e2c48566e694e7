"""``KnnStore.retrieve_arrays``, the bulk lookup of ``next`` that pointer following reads
with, against the per-point ``retrieve`` on both embedded engines; and the vectorised
``successor_ids`` against ``make_point_ids``."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from knn_store import CollectionMeta, PointBatch
from knn_store.store.base import NEXT_FIELD, KnnStore
from knn_store.store.client import QdrantClientStore
from knn_store.store.edge import EdgeStore
from knn_store.store.point_ids import (
    document_hash,
    document_key,
    id_parts,
    make_point_ids,
    successor_ids,
)

DIM = 16
META = CollectionMeta(
    model="tiny",
    model_fingerprint="abc",
    key_type="final",
    dim=DIM,
    vocab_size=50,
    tokenizer="t:1",
    successors=True,
)


def _open(kind: str, path: Path) -> KnnStore:
    if kind == "edge":
        return EdgeStore(path / "linked", create=True)
    return QdrantClientStore.local(path / "local", collection="linked", create=True)


def _filled(kind: str, path: Path) -> tuple[KnnStore, list[str], np.ndarray]:
    """Two documents of 30 points, the second one written without ``next`` fields (as a
    collection made before ``rebuild --successors``); their ids and keys [60, DIM]."""
    rng = np.random.default_rng(0)
    store = _open(kind, path)
    store.ensure_collection(META)
    ids: list[str] = []
    keys = []
    for d, with_next in enumerate((True, False)):
        h = document_hash("dom", f"text {d}")
        tokens = rng.integers(0, 50, 30)
        doc_ids = make_point_ids(h, np.arange(30), tokens)
        doc_keys = rng.standard_normal((30, DIM)).astype(np.float32)
        nexts = [*tokens[1:].tolist(), -1]
        payloads = [
            {"domain": "dom", "doc": document_key(h), "offset": i}
            | ({NEXT_FIELD: nexts[i]} if with_next else {})
            for i in range(30)
        ]
        store.upsert(PointBatch(ids=doc_ids, keys=doc_keys, payloads=payloads))
        ids += doc_ids
        keys.append(doc_keys)
    store.finalize()
    return store, ids, np.concatenate(keys)


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_arrays_equal_the_per_point_lookup(kind: str, tmp_path: Path) -> None:
    store, ids, _ = _filled(kind, tmp_path)
    absent = make_point_ids(document_hash("dom", "never stored"), np.arange(3), np.arange(3))
    # shuffled, with repeats, points without `next`, missing ids, and UUID objects as a
    # search returns them mixed with the strings that successor_ids makes
    order = np.random.default_rng(1).permutation(len(ids))
    wanted: list[object] = [ids[i] for i in order[:40]]
    wanted += [absent[0], ids[order[0]], uuid.UUID(ids[order[1]]), absent[1], ids[59]]
    read = store.retrieve_arrays(wanted)
    per_point = store.retrieve(wanted, with_keys=False, with_payload=[NEXT_FIELD])

    assert read.found.dtype == bool and read.nexts.dtype == np.int64
    assert len(read) == len(wanted)
    assert read.found.tolist() == [str(i) in per_point for i in wanted]
    assert read.found.sum() == len(wanted) - 2  # the two absent ids
    for row, pid in enumerate(wanted):
        point = per_point.get(str(pid))
        if point is None:
            assert read.nexts[row] == -1
            continue
        assert point.payload is not None
        assert read.nexts[row] == point.payload.get(NEXT_FIELD, -1)
    # the second document has no `next`: -1, as has each document's last point
    second = [r for r, pid in enumerate(wanted) if str(pid) in ids[30:]]
    assert second and (read.nexts[second] == -1).all()
    first = [r for r, pid in enumerate(wanted) if str(pid) in ids[:29]]
    assert first and (read.nexts[first] >= 0).all()
    store.close()


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_empty_lookups(kind: str, tmp_path: Path) -> None:
    store = _open(kind, tmp_path)
    new = store.retrieve_arrays(["00000000-0000-0000-0000-000000000001"])
    assert new.found.tolist() == [False] and new.nexts.tolist() == [-1]  # no collection yet
    store.close()
    store, _, _ = _filled(kind, tmp_path)
    read = store.retrieve_arrays([])
    assert read.found.shape == (0,) and read.nexts.shape == (0,)
    absent = make_point_ids(document_hash("dom", "never stored"), np.arange(2), np.arange(2))
    read = store.retrieve_arrays(absent)
    assert not read.found.any() and (read.nexts == -1).all()
    store.close()


def test_successor_ids_equal_make_point_ids() -> None:
    rng = np.random.default_rng(2)
    hashes = [document_hash("dom", f"text {d}") for d in range(5)] + [0, 2**64 - 1]
    doc = rng.integers(0, len(hashes), 200)
    position = rng.integers(0, 2**32 - 1, 200)
    position[:3] = [0, 2**32 - 2, 15]
    token = rng.integers(0, 2**32, 200)
    ids = [
        make_point_ids(hashes[d], np.array([p]), np.array([t]))[0]
        for d, p, t in zip(doc, position, token, strict=True)
    ]
    nexts = rng.integers(0, 2**32, 200)
    nexts[:2] = [0, 2**32 - 1]
    want = [
        make_point_ids(hashes[d], np.array([p + 1]), np.array([n]))[0]
        for d, p, n in zip(doc, position, nexts, strict=True)
    ]
    assert successor_ids(ids, nexts) == want
    mixed = [uuid.UUID(i) if j % 2 else i for j, i in enumerate(ids)]
    assert successor_ids(mixed, nexts) == want
    assert all(str(uuid.UUID(w)) == w for w in want)  # canonical text, as engines write it
    _, succ_position, succ_token = id_parts(want)
    assert (succ_position == position + 1).all() and (succ_token == nexts).all()
    assert successor_ids([], np.zeros(0, dtype=np.int64)) == []


def test_successor_ids_refuse_what_no_id_holds() -> None:
    h = document_hash("d", "t")
    last = make_point_ids(h, np.array([2**32 - 1]), np.array([1]))
    with pytest.raises(ValueError, match="positions"):
        successor_ids(last, np.array([1]))
    first = make_point_ids(h, np.array([0]), np.array([1]))
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="token"):
            successor_ids(first, np.array([bad]))
    with pytest.raises(ValueError, match="length"):
        successor_ids(first, np.array([1, 2]))
