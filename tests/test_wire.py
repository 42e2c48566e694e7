"""The lean server transport without a server: the requests it builds equal what qdrant-client
builds from its own models, and the answers it decodes equal a decode one object at a time
(random answers, and every odd case of the wire: a score or version of 0 that protobuf leaves
out, empty results, payloads, integer ids, long points).

``tests/test_wire_server.py`` checks the same against a real server.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from qdrant_client import grpc, models
from qdrant_client.conversions.conversion import RestToGrpc

from knn_store.store.base import NEXT_FIELD, PointBatch, PointFilter
from knn_store.store.point_ids import id_words, tokens_from_ids
from knn_store.store.wire import (
    SearchSpec,
    _grpc_has_id,
    _hits_by_message,
    _scored_points,
    grpc_hits,
    grpc_points,
    grpc_queries,
    rest_hits,
    rest_points,
    rest_searches,
)

DIM = 6


def _uuids(rng: np.random.Generator, n: int) -> list[str]:
    return [str(uuid.UUID(bytes=rng.bytes(16))) for _ in range(n)]


def _answer(rng: np.random.Generator, counts: list[int]) -> tuple[list[list[str]], list[list]]:
    ids = [_uuids(rng, c) for c in counts]
    scores = [np.sort(rng.random(c) * 5).astype(np.float32).tolist() for c in counts]
    return ids, scores


# --- ids ---------------------------------------------------------------------------------------


def test_id_words_equal_uuid_for_text_objects_and_mixes() -> None:
    rng = np.random.default_rng(0)
    text = _uuids(rng, 50)
    objects = [uuid.UUID(t) for t in text]
    want_high = np.array([u.int >> 64 for u in objects], dtype=np.uint64)
    want_low = np.array([u.int & (2**64 - 1) for u in objects], dtype=np.uint64)
    for ids in (text, objects, [t.replace("-", "") for t in text], [*text[:25], *objects[25:]]):
        high, low = id_words(ids)
        np.testing.assert_array_equal(high, want_high)
        np.testing.assert_array_equal(low, want_low)
        np.testing.assert_array_equal(tokens_from_ids(ids), (want_low & 0xFFFFFFFF).astype(int))
    with pytest.raises(ValueError):
        id_words(["not-a-uuid"])


# --- REST ------------------------------------------------------------------------------------


def test_rest_answers_decode_to_the_hits_in_order() -> None:
    rng = np.random.default_rng(1)
    counts = [5, 0, 3, 7]
    ids, scores = _answer(rng, counts)
    nexts = [[int(v) for v in rng.integers(-1, 100, c)] for c in counts]
    nexts[2][1] = "seven"  # not an integer: read as none, as every reader does
    body = {
        "result": [
            {
                "points": [
                    {"id": i, "version": 3, "score": s, "payload": {NEXT_FIELD: n, "x": [1]}}
                    for i, s, n in zip(row_ids, row_scores, row_nexts, strict=True)
                ]
            }
            for row_ids, row_scores, row_nexts in zip(ids, scores, nexts, strict=True)
        ],
        "status": "ok",
        "time": 0.25,
    }
    nexts[0][0] = -1  # a point without the field (its payload then lacks it)
    del body["result"][0]["points"][0]["payload"][NEXT_FIELD]
    nexts[3][2] = -1  # and one without any payload
    del body["result"][3]["points"][2]["payload"]
    nexts[2][1] = -1
    hits, seconds = rest_hits(json.dumps(body).encode(), with_next=True)
    assert seconds == 0.25
    assert hits.counts.tolist() == counts
    assert hits.ids == [i for row in ids for i in row]
    np.testing.assert_array_equal(hits.scores, [s for row in scores for s in row])
    assert hits.nexts is not None and hits.nexts.tolist() == [v for row in nexts for v in row]
    plain, _ = rest_hits(json.dumps(body).encode())
    assert plain.nexts is None and plain.ids == hits.ids


def test_rest_scores_are_the_servers_float32s_as_grpc_gives_them() -> None:
    """The server writes a float32 score as its shortest decimal (0.1 for float32(0.1)): read
    as a float64 that is another number, and its square may differ from gRPC's in the last
    bit, enough to reorder a tie. Read back as the float32 it is, it equals gRPC's score."""
    scores = np.random.default_rng(8).random(1000).astype(np.float32) * 30
    shortest = [np.format_float_positional(s, unique=True) for s in scores]  # as ryu writes
    body = {
        "result": [
            {
                "points": [
                    {"id": str(uuid.UUID(int=i)), "score": float(t)} for i, t in enumerate(shortest)
                ]
            }
        ],
        "time": 0.0,
    }
    hits, _ = rest_hits(json.dumps(body).encode())
    np.testing.assert_array_equal(hits.scores, scores.astype(np.float64))
    assert (np.array(shortest, dtype=np.float64) != scores.astype(np.float64)).any()


def test_a_rest_answer_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="unexpected search answer"):
        rest_hits(b'{"result": [{"points": [{"id": 7, "score": 1.0}]}]}')  # integer id
    with pytest.raises(ValueError, match="unexpected search answer"):
        rest_hits(b'{"status": {"error": "boom"}}')


def _client_json(request: models.QueryRequest) -> dict:
    body = request.model_dump(mode="json", exclude_none=True)
    # the model writes out a default that the server assumes anyway
    assert body["params"].pop("indexed_only") is False
    return body


SPECS = {
    "plain": SearchSpec(limits=[4, 4, 4], hnsw_ef=64),
    "exact": SearchSpec(limits=[4, 4, 4], exact=True),
    "quantized": SearchSpec(limits=[4, 4, 4], hnsw_ef=32, quantization=(False, True, 2.0)),
    "quantized, defaults": SearchSpec(limits=[4, 4, 4], quantization=(False, None, None)),
    "domains": SearchSpec(limits=[4, 4, 4], filter=PointFilter(domains=("a", "b"))),
    "documents and domains": SearchSpec(
        limits=[4, 4, 4], filter=PointFilter(domains=("a",), docs=("d1",))
    ),
}


def _ids_spec(rng: np.random.Generator) -> SearchSpec:
    ids = [_uuids(rng, 3), _uuids(rng, 1), _uuids(rng, 2)]
    return SearchSpec(
        limits=[3, 1, 2],
        exact=True,
        quantization=(True, None, None),
        filter=PointFilter(domains=("a",)),
        ids=ids,
        with_next=True,
    )


def _client_requests(queries: np.ndarray, spec: SearchSpec) -> list[models.QueryRequest]:
    """The same searches as qdrant-client's models (what the slow path sends)."""
    params = models.SearchParams(hnsw_ef=spec.hnsw_ef, exact=spec.exact)
    if spec.quantization is not None:
        ignore, rescore, oversampling = spec.quantization
        params.quantization = models.QuantizationSearchParams(
            ignore=ignore, rescore=rescore, oversampling=oversampling
        )
    requests = []
    for i, row in enumerate(queries):
        must: list = [
            models.FieldCondition(key=key, match=models.MatchAny(any=values))
            for key, values in spec.filter.conditions()
        ]
        if spec.ids is not None:
            must.append(models.HasIdCondition(has_id=list(spec.ids[i])))
        requests.append(
            models.QueryRequest(
                query=row.tolist(),
                limit=spec.limits[i],
                params=params,
                filter=models.Filter(must=must) if must else None,
                with_payload=[NEXT_FIELD] if spec.with_next else False,
                with_vector=False,
            )
        )
    return requests


@pytest.mark.parametrize("case", [*SPECS, "ids"])
def test_rest_searches_equal_the_clients_models(case: str) -> None:
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    spec = _ids_spec(rng) if case == "ids" else SPECS[case]
    ours = rest_searches(queries, spec)
    theirs = [_client_json(r) for r in _client_requests(queries, spec)]
    assert json.loads(json.dumps(ours)) == theirs
    # the query goes out as the float32 it is: parsed back as float32, bit for bit
    np.testing.assert_array_equal(np.array([s["query"] for s in ours], np.float32), queries)


def test_rest_upsert_body_equals_the_clients_batch() -> None:
    rng = np.random.default_rng(3)
    batch = PointBatch(
        ids=_uuids(rng, 4),
        keys=rng.standard_normal((4, DIM)).astype(np.float32),
        payloads=[{"domain": "a", "doc": "d", "offset": i, "next": i + 1} for i in range(4)],
    )
    theirs = models.PointsBatch(
        batch=models.Batch(ids=batch.ids, vectors=batch.keys.tolist(), payloads=batch.payloads)
    ).model_dump(mode="json", exclude_none=True)
    assert json.loads(json.dumps(rest_points(batch))) == theirs


# --- gRPC ------------------------------------------------------------------------------------


def _grpc_answer(ids: list[list], scores: list[list[float]], **point: object):
    response = grpc.QueryBatchResponse(time=0.5)
    for row_ids, row_scores in zip(ids, scores, strict=True):
        result = response.result.add()
        for i, s in zip(row_ids, row_scores, strict=True):
            pid = grpc.PointId(num=i) if isinstance(i, int) else grpc.PointId(uuid=i)
            result.result.append(grpc.ScoredPoint(id=pid, score=s, **point))  # type: ignore[arg-type]
    return grpc.QueryBatchResponse.FromString(response.SerializeToString())


def _same(a, b) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert (a.nexts is None) == (b.nexts is None)
    if a.nexts is not None:
        np.testing.assert_array_equal(a.nexts, b.nexts)


@pytest.mark.parametrize("seed", range(6))
def test_grpc_answers_decode_from_their_bytes_as_message_by_message(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in rng.integers(0, 40, 8)]
    counts[seed % 8] = 0  # an empty result among them
    ids, scores = _answer(rng, counts)
    if sum(counts):  # a zero distance, and a version of 0 and a large one: left out
        row = next(r for r, c in enumerate(counts) if c)
        scores[row][0] = 0.0
    version = int(rng.choice([0, 1, 300, 2**40]))
    response = _grpc_answer(ids, scores, version=version)
    fast = _scored_points(response)
    assert fast is not None  # the layout it expects
    _same(fast, _hits_by_message(response, with_next=False))
    assert fast.ids == [i for row in ids for i in row]
    np.testing.assert_array_equal(fast.scores, np.float32([s for row in scores for s in row]))
    hits, seconds = grpc_hits(response)
    _same(hits, fast)
    assert seconds == 0.5


def test_grpc_answers_of_another_layout_take_the_general_path() -> None:
    rng = np.random.default_rng(7)
    ids, scores = _answer(rng, [3, 2])
    with_payload = grpc.QueryBatchResponse()
    for row_ids, row_scores in zip(ids, scores, strict=True):
        result = with_payload.result.add()
        for j, (i, s) in enumerate(zip(row_ids, row_scores, strict=True)):
            point = result.result.add(id=grpc.PointId(uuid=i), score=s, version=9)
            if j:
                point.payload[NEXT_FIELD].integer_value = 40 + j
    assert _scored_points(with_payload) is None
    hits, _ = grpc_hits(with_payload, with_next=True)
    assert hits.nexts is not None and hits.nexts.tolist() == [-1, 41, 42, -1, 41]
    assert hits.ids == [i for row in ids for i in row]
    numbered = _grpc_answer([[5, 6]], [[1.0, 2.0]])  # integer ids: not the UUID layout
    assert _scored_points(numbered) is None
    with pytest.raises(ValueError, match="no UUID"):
        grpc_hits(numbered)
    empty = grpc.QueryBatchResponse()
    empty.result.add()
    hits, _ = grpc_hits(empty)
    assert hits.counts.tolist() == [0] and hits.ids == []


@pytest.mark.parametrize("case", [*SPECS, "ids"])
def test_grpc_queries_equal_the_clients_conversion(case: str) -> None:
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    spec = _ids_spec(rng) if case == "ids" else SPECS[case]
    ours = grpc_queries("c", queries, spec)
    theirs = [RestToGrpc.convert_query_request(r, "c") for r in _client_requests(queries, spec)]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert not b.params.indexed_only  # the client writes out the server's own default
        b.params.ClearField("indexed_only")
        assert a == b, (a, b)


@pytest.mark.parametrize("kind", ["uuids", "none", "other text"])
def test_grpc_has_id_equals_a_message_per_id(kind: str) -> None:
    """The id list written as wire bytes parses to the message built id by id; ids that
    are not 36-character UUID text take the message path and say the same."""
    ids = {
        "uuids": _uuids(np.random.default_rng(6), 300),
        "none": [],
        "other text": [*_uuids(np.random.default_rng(7), 2), "short", "é" * 36],
    }[kind]
    expected = grpc.HasIdCondition(has_id=[grpc.PointId(uuid=i) for i in ids])
    assert _grpc_has_id(ids) == expected
    assert _grpc_has_id(ids).SerializeToString() == expected.SerializeToString()


def test_grpc_points_equal_the_clients_conversion() -> None:
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((3, DIM)).astype(np.float32)
    ids = _uuids(rng, 3)
    payloads = [
        {"domain": "a", "doc": "d", "offset": 4, "context": "x y", "next": -1},
        {"domain": "b", "flag": True, "w": 0.5, "none": None},
        {},
    ]
    ours = grpc_points(PointBatch(ids=ids, keys=keys, payloads=payloads))
    for point, pid, key, payload in zip(ours, ids, keys, payloads, strict=True):
        theirs = RestToGrpc.convert_point_struct(
            models.PointStruct(id=pid, vector=key.tolist(), payload=payload)
        )
        assert point == theirs
    with pytest.raises(TypeError, match="payload value"):
        grpc_points(PointBatch(ids=ids[:1], keys=keys[:1], payloads=[{"x": [1, 2]}]))


def test_the_rest_transport_is_the_clients_own_and_a_moved_one_is_refused() -> None:
    """``rest_transport`` is the one reach into qdrant-client's private REST client: it gives
    that client's httpx transport (the API key header and TLS settings included) and base
    URL, and refuses, in one line, a client that keeps them elsewhere."""
    import httpx
    from qdrant_client import QdrantClient

    from knn_store.errors import StoreError
    from knn_store.store.client import rest_transport

    client = QdrantClient(
        url="https://127.0.0.1:1", api_key="k-1", https=True, check_compatibility=False
    )
    try:
        http, base = rest_transport(client)
        assert isinstance(http, httpx.Client)
        assert base == "https://127.0.0.1:1"
        assert http.headers.get("api-key") == "k-1"
    finally:
        client.close()

    class Moved:
        http = None

    with pytest.raises(StoreError, match="keeps its REST transport elsewhere"):
        rest_transport(Moved())
