"""Lean reads and writes for a Qdrant server, over REST or gRPC: a batch of searches, or of
points, as one request built from numpy, its answer decoded straight into ``Hits`` arrays.

qdrant-client answers a batch of 256 searches for 1,024 neighbours with 262,144 pydantic
models and takes a model per point to upsert; at knnlm's batch sizes that costs two thirds of
a search and most of an upsert. Here nothing is built per hit but the id text the answer
itself carries:

- REST: the body is encoded, and the answer decoded, by msgspec against the few fields knnlm
  reads (id, score, the ``next`` payload field): measured on a 25 MB answer of 262,144 hits,
  32 ms against orjson's 88 ms into dicts (112 ms with the fields picked out) and the
  standard library's 215 ms, since a typed decoder skips what it is not asked for.
- gRPC: qdrant-client's own generated stubs and protobuf messages, without its conversion
  to models; the stub carries the client's channel, key and TLS. The hits of a plain search
  are read from the answer's wire bytes with numpy (72 ms for 262,144 hits, against 288 ms
  one message at a time); any other layout goes through the messages.

Everything else (collections, metadata, snapshots, counts) stays with qdrant-client; errors
come out as qdrant-client's (``UnexpectedResponse``, ``grpc.RpcError``), so the store's one
retry and classification (``QdrantClientStore._call``) covers both paths.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msgspec
import numpy as np

from knn_store.store.base import NEXT_FIELD, Hits, PointBatch, PointFilter


@dataclass(frozen=True)
class SearchSpec:
    """What a batch of searches asks of the server, beside the query vectors.

    limits: int [b], the neighbours wanted per query.
    hnsw_ef, exact: the search parameters (ef None: the server's own).
    quantization: None, or (ignore, rescore, oversampling) for a quantized collection.
    filter: the ``PointFilter`` of every query (domains, documents).
    ids: per query, the only point ids it may return (pointer following), or None.
    with_next: read each hit's ``next`` payload field (and nothing else of the payload).
    """

    limits: Sequence[int]
    hnsw_ef: int | None = None
    exact: bool = False
    quantization: tuple[bool, bool | None, float | None] | None = None
    filter: PointFilter = field(default_factory=PointFilter)
    ids: Sequence[Sequence[Any]] | None = None
    with_next: bool = False


class Wire(abc.ABC):
    """The lean transport of one collection: ``search`` and ``upsert``."""

    name: str  # "REST" or "gRPC"

    def __init__(self) -> None:
        self.server_seconds = 0.0  # the server's own time over every search, as it reports
        self._lock = threading.Lock()  # searches of one batch may run in several threads

    def _add_server_seconds(self, seconds: float) -> None:
        with self._lock:
            self.server_seconds += seconds

    @abc.abstractmethod
    def search(self, queries: np.ndarray, spec: SearchSpec) -> Hits:
        """The hits of every row of ``queries`` (float32 [b, dim]), in the server's order."""

    @abc.abstractmethod
    def upsert(self, batch: PointBatch) -> None:
        """Write ``batch`` and wait until the server has applied it."""


# --- REST ------------------------------------------------------------------------------------


class _Payload(msgspec.Struct):
    next: Any = -1


class _Hit(msgspec.Struct):
    id: str
    score: float
    payload: _Payload | None = None


class _Result(msgspec.Struct):
    points: list[_Hit]


class _SearchAnswer(msgspec.Struct):
    result: list[_Result]
    time: float = 0.0


class _UpdateResult(msgspec.Struct):
    status: str


class _UpdateAnswer(msgspec.Struct):
    result: _UpdateResult


_SEARCH_ANSWER = msgspec.json.Decoder(_SearchAnswer)
_UPDATE_ANSWER = msgspec.json.Decoder(_UpdateAnswer)
_ENCODER = msgspec.json.Encoder()
_JSON = {"Content-Type": "application/json"}


def rest_hits(body: bytes, *, with_next: bool = False) -> tuple[Hits, float]:
    """The hits of a ``points/query/batch`` answer (with their ``next`` fields, where
    asked), and the server's own seconds."""
    try:
        answer = _SEARCH_ANSWER.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"unexpected search answer from Qdrant: {exc}") from exc
    points = [hit for result in answer.result for hit in result.points]
    counts = np.fromiter((len(r.points) for r in answer.result), np.int64, len(answer.result))
    nexts = None
    if with_next:
        nexts = np.fromiter(
            (_int(h.payload.next) if h.payload is not None else -1 for h in points),
            np.int64,
            len(points),
        )
    return (
        Hits(
            counts=counts,
            ids=[h.id for h in points],
            # the server's scores are float32, written as the shortest decimal that reads back
            # as that float32: read back so, they equal gRPC's to the bit
            scores=np.fromiter((h.score for h in points), np.float32, len(points)).astype(
                np.float64
            ),
            nexts=nexts,
        ),
        answer.time,
    )


def rest_searches(queries: np.ndarray, spec: SearchSpec) -> list[dict[str, Any]]:
    """The ``searches`` of a REST ``QueryRequestBatch``."""
    params: dict[str, Any] = {"exact": spec.exact}
    if spec.hnsw_ef is not None:
        params["hnsw_ef"] = spec.hnsw_ef
    if spec.quantization is not None:
        ignore, rescore, oversampling = spec.quantization
        params["quantization"] = {
            k: v
            for k, v in (("ignore", ignore), ("rescore", rescore), ("oversampling", oversampling))
            if v is not None
        }
    shared = _rest_conditions(spec.filter)
    searches = []
    for i, row in enumerate(queries.tolist()):
        must = list(shared)
        if spec.ids is not None:
            must.append({"has_id": [str(p) for p in spec.ids[i]]})
        search: dict[str, Any] = {
            "query": row,
            "limit": int(spec.limits[i]),
            "params": params,
            "with_payload": [NEXT_FIELD] if spec.with_next else False,
            "with_vector": False,
        }
        if must:
            search["filter"] = {"must": must}
        searches.append(search)
    return searches


def rest_points(batch: PointBatch) -> dict[str, Any]:
    """The body of a REST upsert of ``batch``, as one column-wise ``batch``."""
    return {
        "batch": {
            "ids": batch.ids,
            "vectors": batch.keys.tolist(),
            "payloads": batch.payloads,
        }
    }


def _rest_conditions(flt: PointFilter) -> list[dict[str, Any]]:
    return [{"key": key, "match": {"any": values}} for key, values in flt.conditions()]


class RestWire(Wire):
    """Searches and upserts as raw REST calls through the client's own ``httpx.Client``
    (its base URL, key header, TLS settings and timeout)."""

    name = "REST"

    def __init__(self, http: Any, base_url: str, collection: str) -> None:
        super().__init__()
        self._http = http
        self._points = f"{base_url.rstrip('/')}/collections/{quote(collection, safe='')}/points"

    def _send(self, method: str, path: str, body: Any) -> bytes:
        from qdrant_client.http.exceptions import UnexpectedResponse

        response = self._http.request(
            method, self._points + path, content=_ENCODER.encode(body), headers=_JSON
        )
        if response.status_code != 200:
            raise UnexpectedResponse.for_response(response)
        return response.content

    def search(self, queries: np.ndarray, spec: SearchSpec) -> Hits:
        body = self._send("POST", "/query/batch", {"searches": rest_searches(queries, spec)})
        hits, seconds = rest_hits(body, with_next=spec.with_next)
        self._add_server_seconds(seconds)
        return hits

    def upsert(self, batch: PointBatch) -> None:
        answer = _UPDATE_ANSWER.decode(self._send("PUT", "?wait=true", rest_points(batch)))
        _check_completed(answer.result.status)


# --- gRPC ------------------------------------------------------------------------------------


def grpc_hits(response: Any, *, with_next: bool = False) -> tuple[Hits, float]:
    """The hits of a ``QueryBatchResponse`` (with their ``next`` fields, where asked), and
    the server's own seconds."""
    hits = None if with_next else _scored_points(response)
    if hits is None:
        hits = _hits_by_message(response, with_next=with_next)
    return hits, response.time


def _hits_by_message(response: Any, *, with_next: bool) -> Hits:
    """``grpc_hits`` through protobuf's objects: one per hit (the general path)."""
    results = [result.result for result in response.result]
    points = [hit for hits in results for hit in hits]
    nexts = None
    if with_next:
        nexts = np.fromiter(
            (_grpc_int(hit.payload.get(NEXT_FIELD)) for hit in points), np.int64, len(points)
        )
    ids = [hit.id.uuid for hit in points]
    if not all(ids):
        raise ValueError("a point id that is no UUID: this is not a collection knnlm made")
    return Hits(
        counts=np.fromiter((len(r) for r in results), np.int64, len(results)),
        ids=ids,
        scores=np.fromiter((hit.score for hit in points), np.float64, len(points)),
        nexts=nexts,
    )


# A ScoredPoint (prost writes fields in tag order) with a UUID id and no payload:
#   0x0A len(1 byte) | 0x0A 0x26 0x12 0x24 <36 bytes of UUID text> | [0x1D <f32 score>]
#   | [0x28 <varint version>]      (a score or version of 0 is left out, as proto3 does)
# Each BatchResult is a run of (0x0A, length, ScoredPoint), so the results written one after
# another form one unbroken chain of points.
_ID_HEAD = (0x0A, 0x26, 0x12, 0x24)  # ScoredPoint.id (38 bytes): PointId.uuid (36 bytes)
_SCORE_TAG, _VERSION_TAG = 0x1D, 0x28


def _scored_points(response: Any) -> Hits | None:
    """``grpc_hits`` for a plain search, decoded from the results' wire bytes with numpy: no
    object per hit but its id text. None where the bytes are not of the layout above (an
    integer id, a payload, a long point): then the general path decodes them."""
    blobs = [result.SerializeToString() for result in response.result]  # [b]
    buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)  # every point of every result
    ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)  # [b]
    if len(buf) == 0:
        return Hits(np.zeros(len(blobs), np.int64), [], np.zeros(0), None)
    if len(buf) < 44:
        return None
    marks = np.flatnonzero(buf == _ID_HEAD[1])  # the id's length byte, and stray 0x26s
    marks = marks[(marks >= 1) & (marks + 2 < len(buf))]
    head = (
        (buf[marks - 1] == _ID_HEAD[0])
        & (buf[marks + 1] == _ID_HEAD[2])
        & (buf[marks + 2] == _ID_HEAD[3])
    )
    body = marks[head] - 1  # [n], where each point's id starts
    if len(body) == 0 or body[0] != 2:
        return None
    start, length = body - 2, buf[body - 1].astype(np.int64)  # [n] each
    after = start + 2 + length  # [n], where the next point starts
    chained = (
        (length < 0x80).all()  # one-byte lengths
        and (buf[start] == 0x0A).all()
        and (after[:-1] == start[1:]).all()
        and after[-1] == len(buf)
        and (length >= 40).all()
    )
    if not chained:
        return None
    tag_at = body + 40  # [n], what follows the id: the score, the version, or the next point
    tag = np.where(tag_at < after, buf[np.minimum(tag_at, len(buf) - 1)], 0)  # [n]
    scored = tag == _SCORE_TAG  # [n]
    if not np.isin(tag, (0, _SCORE_TAG, _VERSION_TAG)).all():
        return None
    if (tag_at + 5 > after)[scored].any():
        return None
    windows = np.lib.stride_tricks.sliding_window_view
    score_bytes = windows(buf, 4)[tag_at[scored] + 1]  # [s, 4], little-endian
    scores = np.zeros(len(body), dtype=np.float64)
    scores[scored] = score_bytes.view("<f4").ravel()
    uuid_text = windows(buf, 36)[body + 4]  # [n, 36] ASCII
    ids = [raw.decode("ascii") for raw in uuid_text.view("S36").ravel().tolist()]
    counts = np.diff(np.searchsorted(start, ends), prepend=0)  # [b]
    return Hits(counts=counts.astype(np.int64), ids=ids, scores=scores, nexts=None)


def grpc_queries(collection: str, queries: np.ndarray, spec: SearchSpec) -> list[Any]:
    """The ``QueryPoints`` messages of a batch."""
    from qdrant_client import grpc

    params = grpc.SearchParams(exact=spec.exact)
    if spec.hnsw_ef is not None:
        params.hnsw_ef = spec.hnsw_ef
    if spec.quantization is not None:
        ignore, rescore, oversampling = spec.quantization
        params.quantization.ignore = ignore
        if rescore is not None:
            params.quantization.rescore = rescore
        if oversampling is not None:
            params.quantization.oversampling = oversampling
    shared = _grpc_conditions(spec.filter)
    if spec.with_next:
        with_payload = grpc.WithPayloadSelector(
            include=grpc.PayloadIncludeSelector(fields=[NEXT_FIELD])
        )
    else:
        with_payload = grpc.WithPayloadSelector(enable=False)
    no_vectors = grpc.WithVectorsSelector(enable=False)
    requests = []
    for i, row in enumerate(queries.tolist()):
        must = list(shared)
        if spec.ids is not None:
            must.append(grpc.Condition(has_id=_grpc_has_id(spec.ids[i])))
        requests.append(
            grpc.QueryPoints(
                collection_name=collection,
                query=grpc.Query(nearest=grpc.VectorInput(dense=grpc.DenseVector(data=row))),
                limit=int(spec.limits[i]),
                params=params,
                filter=grpc.Filter(must=must) if must else None,
                with_payload=with_payload,
                with_vectors=no_vectors,
            )
        )
    return requests


def _grpc_has_id(ids: Sequence[Any]) -> Any:
    """The ``HasIdCondition`` of a row's point ids. UUID ids (all of knnlm's) are written as
    its wire bytes, ``_ID_HEAD`` and the id's text per id, and parsed in one call: a
    ``PointId`` message per id cost more than the search of its row (4.6 ms against 0.1 ms
    for 1,024 ids)."""
    from qdrant_client import grpc

    texts = [str(p) for p in ids]
    if not all(len(text) == 36 and text.isascii() for text in texts):
        return grpc.HasIdCondition(has_id=[grpc.PointId(uuid=text) for text in texts])
    body = np.empty((len(texts), 40), dtype=np.uint8)  # [n, 4 + 36]
    body[:, :4] = _ID_HEAD  # HasIdCondition.has_id = 1 (38 bytes): PointId.uuid = 2 (36)
    body[:, 4:] = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8).reshape(-1, 36)
    return grpc.HasIdCondition.FromString(body.tobytes())


def grpc_points(batch: PointBatch) -> list[Any]:
    """The ``PointStruct`` messages of ``batch``."""
    from qdrant_client import grpc

    return [
        grpc.PointStruct(
            id=grpc.PointId(uuid=pid),
            vectors=grpc.Vectors(vector=grpc.Vector(dense=grpc.DenseVector(data=key))),
            payload={name: _grpc_value(value) for name, value in payload.items()},
        )
        for pid, key, payload in zip(batch.ids, batch.keys.tolist(), batch.payloads, strict=True)
    ]


def _grpc_conditions(flt: PointFilter) -> list[Any]:
    from qdrant_client import grpc

    return [
        grpc.Condition(
            field=grpc.FieldCondition(
                key=key, match=grpc.Match(keywords=grpc.RepeatedStrings(strings=values))
            )
        )
        for key, values in flt.conditions()
    ]


def _grpc_value(value: Any) -> Any:
    """A payload value (str, int, float, bool or None: what knnlm stores) as a gRPC Value."""
    from qdrant_client import grpc

    if value is None:
        return grpc.Value(null_value=grpc.NullValue.NULL_VALUE)
    if isinstance(value, bool):
        return grpc.Value(bool_value=value)
    if isinstance(value, int):
        return grpc.Value(integer_value=value)
    if isinstance(value, float):
        return grpc.Value(double_value=value)
    if isinstance(value, str):
        return grpc.Value(string_value=value)
    raise TypeError(f"payload value of type {type(value).__name__} is not one knnlm stores")


class GrpcWire(Wire):
    """Searches and upserts through the client's generated ``Points`` stub."""

    name = "gRPC"

    def __init__(self, stub: Callable[[], Any], collection: str, *, timeout: float) -> None:
        super().__init__()
        self._stub = stub  # the client's stub (it may round-robin over several channels)
        self._collection = collection
        self._timeout = timeout

    def search(self, queries: np.ndarray, spec: SearchSpec) -> Hits:
        from qdrant_client import grpc

        request = grpc.QueryBatchPoints(
            collection_name=self._collection,
            query_points=grpc_queries(self._collection, queries, spec),
            timeout=int(self._timeout),
        )
        answer = self._stub().QueryBatch(request, timeout=self._timeout)
        hits, seconds = grpc_hits(answer, with_next=spec.with_next)
        self._add_server_seconds(seconds)
        return hits

    def upsert(self, batch: PointBatch) -> None:
        from qdrant_client import grpc

        request = grpc.UpsertPoints(
            collection_name=self._collection, wait=True, points=grpc_points(batch)
        )
        response = self._stub().Upsert(request, timeout=self._timeout)
        _check_completed(grpc.UpdateStatus.Name(response.result.status))


# --- shared ----------------------------------------------------------------------------------


def _check_completed(status: str) -> None:
    if status.lower() != "completed":
        raise ValueError(f"Qdrant answered the upsert with status {status!r}, not completed")


def _int(value: Any) -> int:
    """An integer payload value; -1 for anything else (``base.int_field``'s rule)."""
    return int(value) if isinstance(value, int) else -1


def _grpc_int(value: Any) -> int:
    if value is None or value.WhichOneof("kind") != "integer_value":
        return -1
    return int(value.integer_value)
