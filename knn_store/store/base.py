"""What every datastore backend offers, and the plain types that cross its boundary.

Qdrant types never leave a backend module: callers see ``Neighbours``, ``PointBatch`` and
``CollectionMeta`` only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from knn_store.errors import DimensionMismatch, StoreError
from knn_store.store.point_ids import tokens_from_ids

# Payload fields. "domain" and "doc" carry keyword indexes: domain for filtering a search to
# some domains, doc for counting what a resumed ingest already stored.
DOMAIN_FIELD = "domain"
DOC_FIELD = "doc"
SOURCE_FIELD = "source"
OFFSET_FIELD = "offset"  # token position in the document (BOS = 0)
CONTEXT_FIELD = "context"  # the text just before the stored next token, for `explain`


@dataclass(frozen=True)
class Neighbours:
    """Result of a batched k-nearest-neighbour search.

    token_ids: int64 [b, k], each neighbour's value (the next token); -1 where fewer than k.
    sq_distances: float32 [b, k], squared L2, ascending per row; +inf where fewer than k.
    point_ids: object [b, k], the point ids (None where fewer than k), for looking up a
        neighbour's key or provenance; None when not kept.
    cosine: float32 [b], cosine similarity of each query and its nearest key (0 where there
        is none); None unless asked for (``KnnLM.neighbours``).
    """

    token_ids: np.ndarray
    sq_distances: np.ndarray
    point_ids: np.ndarray | None = None
    cosine: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def concat(cls, parts: list[Neighbours], *, k: int) -> Neighbours:
        if not parts:
            empty = np.zeros((0, k))
            return cls(empty.astype(np.int64), empty.astype(np.float32), empty.astype(object))

        def join(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        return cls(
            token_ids=np.concatenate([p.token_ids for p in parts]),
            sq_distances=np.concatenate([p.sq_distances for p in parts]),
            point_ids=join([p.point_ids for p in parts]),
            cosine=join([p.cosine for p in parts]),
        )


@dataclass(frozen=True)
class StoredPoint:
    """One point read back by id: its key and/or payload, as asked for."""

    id: str
    key: np.ndarray | None  # float32 [dim]
    payload: dict[str, Any] | None

    @classmethod
    def from_record(cls, record: Any, *, with_keys: bool, with_payload: bool) -> StoredPoint:
        """From a Qdrant record (qdrant-client's and Edge's have the same fields)."""
        return cls(
            id=str(record.id),
            key=np.asarray(record.vector, dtype=np.float32) if with_keys else None,
            payload=dict(record.payload or {}) if with_payload else None,
        )


@dataclass(frozen=True)
class PointBatch:
    """Points to upsert, one row each.

    ids: list of point ids (UUID strings), n.
    keys: float32 [n, dim].
    payloads: n dicts with domain, doc, source, offset and context.
    """

    ids: list[str]
    keys: np.ndarray
    payloads: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> PointBatch:
        return PointBatch(self.ids[rows], self.keys[rows], self.payloads[rows])

    @classmethod
    def concat(cls, batches: list[PointBatch]) -> PointBatch:
        if len(batches) == 1:
            return batches[0]
        return cls(
            ids=[i for b in batches for i in b.ids],
            keys=np.concatenate([b.keys for b in batches]),
            payloads=[p for b in batches for p in b.payloads],
        )


FORMAT_VERSION = 1  # bump when the stored layout (ids, payloads, meta) changes


@dataclass(frozen=True)
class CollectionMeta:
    """What built a collection. A datastore is only valid for the model and key that made it."""

    model: str  # human-readable name: hub id, directory or .gguf file name
    model_fingerprint: str  # hash of the weights, so a renamed model still matches
    key_type: str
    dim: int
    vocab_size: int
    tokenizer: str  # tokenizer class and a hash of its vocabulary
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectionMeta:
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise StoreError(
                f"this collection has format {version}, newer than this knnlm reads "
                f"({FORMAT_VERSION}); upgrade knnlm"
            )
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def check_compatible(self, other: CollectionMeta, *, collection: str) -> None:
        """Raise ``DimensionMismatch`` naming both sides if ``other`` cannot use this store."""
        if self.model_fingerprint != other.model_fingerprint or self.key_type != other.key_type:
            raise DimensionMismatch(
                f"collection {collection!r} was built with model {self.model!r} "
                f"(key {self.key_type}), but you are using model {other.model!r} "
                f"(key {other.key_type}); use the same model and --key-type, "
                "or another --collection"
            )
        if self.tokenizer != other.tokenizer or self.vocab_size != other.vocab_size:
            raise DimensionMismatch(
                f"collection {collection!r} was built with tokenizer {self.tokenizer} "
                f"({self.vocab_size} tokens), but the model now has {other.tokenizer} "
                f"({other.vocab_size} tokens); use another --collection"
            )
        if self.dim != other.dim:
            raise DimensionMismatch(
                f"collection {collection!r} holds {self.dim}-d keys, but the model gives "
                f"{other.dim}-d keys; use another --collection"
            )


def neighbours_from_hits(
    ids: list[list[object]], scores: list[list[float]], *, k: int
) -> Neighbours:
    """Pad per-query hit lists to [b, k] arrays; Qdrant's Euclid score is plain L2, so square it."""
    b = len(ids)
    token_ids = np.full((b, k), -1, dtype=np.int64)
    sq_distances = np.full((b, k), np.inf, dtype=np.float32)
    point_ids = np.full((b, k), None, dtype=object)
    counts = np.fromiter((len(row) for row in ids), dtype=np.int64, count=b)  # [b]
    if counts.sum():
        mask = np.arange(k)[None, :] < counts[:, None]  # [b, k], True where a hit exists
        flat_ids = [pid for row in ids for pid in row]
        token_ids[mask] = tokens_from_ids(flat_ids)
        point_ids[mask] = flat_ids
        dist = np.fromiter((s for row in scores for s in row), dtype=np.float64)
        sq_distances[mask] = (dist * dist).astype(np.float32)
    return Neighbours(token_ids=token_ids, sq_distances=sq_distances, point_ids=point_ids)


class KnnStore(Protocol):
    """A (key -> next token) datastore with batched Euclidean top-k search."""

    name: str  # collection name

    @property
    def meta(self) -> CollectionMeta | None:
        """What built the collection, or None while it is still empty and new."""
        ...

    def ensure_collection(self, meta: CollectionMeta) -> None:
        """Create the collection for ``meta``, or check that the existing one matches it."""
        ...

    def upsert(self, batch: PointBatch) -> None:
        """Write points; existing ids are overwritten, so repeating a batch is harmless."""
        ...

    def search(
        self,
        queries: np.ndarray,
        *,
        k: int,
        exact: bool,
        hnsw_ef: int,
        domains: list[str] | None = None,
    ) -> Neighbours:
        """Top-k neighbours of each row of ``queries`` (float32 [b, dim])."""
        ...

    def retrieve(
        self, ids: list[Any], *, with_keys: bool, with_payload: bool
    ) -> dict[str, StoredPoint]:
        """Points by id (as ``Neighbours.point_ids`` holds them), keyed by their id string."""
        ...

    def count(self, *, doc: str | None = None) -> int:
        """Number of points, optionally of one document."""
        ...

    def load_policy(self) -> dict[str, Any] | None:
        """The lambda policy saved by ``knnlm tune``, or None."""
        ...

    def save_policy(self, policy: dict[str, Any]) -> None:
        """Keep ``policy`` with the collection, replacing any earlier one."""
        ...

    def domains(self) -> dict[str, int]:
        """Points per domain tag."""
        ...

    def finalize(self) -> None:
        """Make every written point durable and searchable at full speed (build indexes)."""
        ...

    def close(self) -> None: ...
