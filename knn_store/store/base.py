"""What every datastore backend offers, the code they share, and the plain types that cross
their boundary.

Qdrant types never leave a backend module: callers see ``Neighbours``, ``PointBatch``,
``StoredPoint``, ``PointArrays``, ``PointFilter`` and ``CollectionMeta`` only. ``KnnStore``
holds everything the two engines do alike (meta checks, the ef rule, record mapping, counting
by facet); a backend implements the few ``_``-prefixed primitives below.

It is long because it is the one place that code lives: the engines only translate.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from knn_store.errors import (
    CollectionMissing,
    ConfigError,
    DimensionMismatch,
    StoreDamaged,
    StoreError,
)
from knn_store.progress import Progress, no_progress
from knn_store.store.config import SearchOptions, StorageConfig
from knn_store.store.point_ids import tokens_from_ids

# Payload fields. "domain" and "doc" carry keyword indexes: domain for filtering a search to
# some domains, doc for counting what a resumed ingest already stored.
DOMAIN_FIELD = "domain"
DOC_FIELD = "doc"
SOURCE_FIELD = "source"
OFFSET_FIELD = "offset"  # token position in the document (BOS = 0)
CONTEXT_FIELD = "context"  # the text just before the stored next token, for `explain`
# The successor's value (the token two places after the key's position; -1 at a document's
# end), in collections that ``knnlm rebuild --successors`` made: pointer following reads it
# for the points it follows, to name their successors (``point_ids.successor_ids``).
NEXT_FIELD = "next"
INDEXED_FIELDS = (DOMAIN_FIELD, DOC_FIELD)
FACET_LIMIT = 100_000_000  # "every value": facets list all documents of a collection


@dataclass(frozen=True)
class Neighbours:
    """Result of a batched k-nearest-neighbour search.

    token_ids: int64 [b, k], each neighbour's value (the next token); -1 where fewer than k.
    sq_distances: float32 [b, k], squared L2, ascending per row; +inf where fewer than k.
    point_ids: object [b, k], the point ids (None where fewer than k), for looking up a
        neighbour's key or provenance.
    cosine: float32 [b], cosine similarity of each query and its nearest key (0 where there
        is none); None unless asked for.
    """

    token_ids: np.ndarray
    sq_distances: np.ndarray
    point_ids: np.ndarray | None = None
    cosine: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def empty(cls, b: int, k: int) -> Neighbours:
        """b rows without any neighbour (for queries that were not searched)."""
        return cls(
            token_ids=np.full((b, k), -1, dtype=np.int64),
            sq_distances=np.full((b, k), np.inf, dtype=np.float32),
            point_ids=np.full((b, k), None, dtype=object),
            cosine=np.zeros(b, dtype=np.float32),
        )

    @classmethod
    def concat(cls, parts: list[Neighbours], *, k: int) -> Neighbours:
        if not parts:
            return cls.empty(0, k)

        def join(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        return cls(
            token_ids=np.concatenate([p.token_ids for p in parts]),
            sq_distances=np.concatenate([p.sq_distances for p in parts]),
            point_ids=join([p.point_ids for p in parts]),
            cosine=join([p.cosine for p in parts]),
        )

    def first(self, k: int) -> Neighbours:
        """The first k neighbours of every row (their nearest, as rows ascend)."""
        return Neighbours(
            token_ids=self.token_ids[:, :k],
            sq_distances=self.sq_distances[:, :k],
            point_ids=None if self.point_ids is None else self.point_ids[:, :k],
            cosine=self.cosine,
        )

    def scatter(self, rows: np.ndarray, n: int) -> Neighbours:
        """These neighbours placed at ``rows`` (int [b]) of n rows; the other rows empty."""
        k = self.token_ids.shape[1]
        out = Neighbours.empty(n, k)
        out.token_ids[rows] = self.token_ids
        out.sq_distances[rows] = self.sq_distances
        if self.point_ids is not None:
            assert out.point_ids is not None
            out.point_ids[rows] = self.point_ids
        if self.cosine is None:
            return Neighbours(out.token_ids, out.sq_distances, out.point_ids, None)
        assert out.cosine is not None
        out.cosine[rows] = self.cosine
        return out


@dataclass(frozen=True)
class StoredPoint:
    """One point read back by id: its key and/or payload, as asked for."""

    id: str
    key: np.ndarray | None  # float32 [dim]
    payload: dict[str, Any] | None


@dataclass(frozen=True)
class PointArrays:
    """Points read back by id as arrays, row i for the i-th id asked for (see
    ``KnnStore.retrieve_arrays``).

    found: bool [n], whether the point exists.
    nexts: int64 [n], its ``next`` payload field; -1 where it has none or is not found.
    """

    found: np.ndarray
    nexts: np.ndarray

    def __len__(self) -> int:
        return len(self.found)


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


@dataclass(frozen=True)
class PointFilter:
    """Which points an operation covers: those of any of ``domains`` and any of ``docs``
    (an empty tuple does not restrict)."""

    domains: tuple[str, ...] = ()
    docs: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.domains or self.docs)

    def conditions(self) -> list[tuple[str, list[str]]]:
        """(payload field, accepted values) pairs, all of which must hold."""
        return [
            (f, list(v)) for f, v in ((DOMAIN_FIELD, self.domains), (DOC_FIELD, self.docs)) if v
        ]


FORMAT_VERSION = 1  # bump when the stored layout (ids, payloads, meta) changes incompatibly


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
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Made by ``knnlm rebuild`` or ``push``: the source (name and location). ``copying``
    # stays True until the copy's counts agree; readers refuse such a collection.
    copy_of: str | None = None
    copying: bool = False
    # How ``model_fingerprint`` was computed: 1, the embeddings and the last block (records
    # made before 2026-12); 2, every parameter but an untied LM head.
    fingerprint_scheme: int = 1
    # Every point carries ``NEXT_FIELD``, so pointer following can reach its successor.
    # Older knnlm versions ignore the field (``from_dict`` keeps only the fields it knows).
    successors: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "storage": self.storage.to_dict()}

    @staticmethod
    def check_version(data: Any) -> None:
        """Refuse a record that is no object, or that a newer knnlm wrote (its fields, and
        even its checksum, may mean something else)."""
        if not isinstance(data, dict):
            raise StoreDamaged(f"collection record is not a JSON object: {str(data)[:80]}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"this collection has format {version}, newer than this knnlm reads "
                f"({FORMAT_VERSION}); upgrade knnlm"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectionMeta:
        cls.check_version(data)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "storage"}
        try:
            meta = cls(**known, storage=StorageConfig.from_dict(data.get("storage")))
        except (TypeError, ValueError, ConfigError, KeyError) as exc:
            raise StoreDamaged(f"collection record is incomplete or invalid: {exc}") from exc
        if not isinstance(meta.dim, int) or meta.dim < 1:
            raise StoreDamaged(f"collection record has an invalid dimension {meta.dim!r}")
        return meta

    def check_compatible(self, other: CollectionMeta, *, collection: str) -> None:
        """Raise ``DimensionMismatch`` naming both sides if ``other`` cannot use this store.
        Both must fingerprint the model the same way (``fingerprint_scheme``)."""
        if self.fingerprint_scheme != other.fingerprint_scheme:
            raise ConfigError(
                f"cannot compare model fingerprints of schemes {self.fingerprint_scheme} and "
                f"{other.fingerprint_scheme} (collection {collection!r})"
            )
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

    def check_storage(self, requested: dict[str, Any], *, collection: str) -> None:
        """Raise ``DimensionMismatch`` if storage settings given explicitly (``StorageConfig``
        field -> value) differ from the collection's: they are fixed at creation."""
        for name, value in requested.items():
            have = getattr(self.storage, name)
            if have != value:
                flag = "--" + ("vector-datatype" if name == "datatype" else name.replace("_", "-"))
                command = " ".join(["knnlm rebuild --to-collection NEW", _typed(flag, value)])
                raise DimensionMismatch(
                    f"collection {collection!r} was created with {_said(flag, have)}, not "
                    f"{_said(flag, value)}; copy it into a new collection with "
                    f"`{command.strip()}`, or drop the flag"
                )


def _typed(flag: str, value: Any) -> str:
    """A setting as the command line takes it: ``--x``/``--no-x`` for a switch, ``--x V``
    for a value, nothing for the default."""
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return "" if value is None else f"{flag} {value}"


def _said(flag: str, value: Any) -> str:
    return _typed(flag, value) or f"no {flag} (the default)"


def int_field(payload: dict[str, Any] | None, field: str) -> int:
    """An integer payload field; -1 where the payload lacks it or holds something else."""
    value = (payload or {}).get(field, -1)
    return int(value) if isinstance(value, int) else -1


@dataclass(frozen=True)
class Hits:
    """The hits of a batch of searches as the engine answered them, flat and in its order
    (each query's nearest first): what every backend's search primitive returns.

    counts: int64 [b], hits per query (row i's hits follow rows 0..i-1's).
    ids: n point ids, ``uuid.UUID`` objects or their text, as the engine gives them.
    scores: float64 [n], Qdrant's Euclid score (the plain L2 distance).
    nexts: int64 [n], each hit's ``next`` payload field (-1 where it has none); None where
        the search did not read it.
    """

    counts: np.ndarray
    ids: list[Any]
    scores: np.ndarray
    nexts: np.ndarray | None = None

    @classmethod
    def from_rows(
        cls,
        ids: Sequence[Sequence[Any]],
        scores: Sequence[Sequence[float]],
        nexts: Sequence[Sequence[int]] | None = None,
    ) -> Hits:
        """Hits from per-query lists (an engine that answers with an object per hit)."""
        counts = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        n = int(counts.sum())
        return cls(
            counts=counts,
            ids=[pid for row in ids for pid in row],
            scores=np.fromiter((s for row in scores for s in row), dtype=np.float64, count=n),
            nexts=None
            if nexts is None
            else np.fromiter((v for row in nexts for v in row), dtype=np.int64, count=n),
        )

    @classmethod
    def concat(cls, parts: Sequence[Hits]) -> Hits:
        """The hits of consecutive query batches, as one batch."""
        nexts = [p.nexts for p in parts]
        return cls(
            counts=np.concatenate([p.counts for p in parts]),
            ids=[pid for p in parts for pid in p.ids],
            scores=np.concatenate([p.scores for p in parts]),
            nexts=None if any(n is None for n in nexts) else np.concatenate(nexts),  # type: ignore[arg-type]
        )


def neighbours_from_hits(hits: Hits, *, k: int) -> Neighbours:
    """Pad per-query hits to [b, k] arrays; Qdrant's Euclid score is plain L2, so square it.

    A non-finite or negative score (a damaged vector) becomes a missing neighbour, so the
    kNN distribution never sees NaN.
    """
    return _rows_from_hits(hits, k=k)[0]


def _rows_from_hits(hits: Hits, *, k: int) -> tuple[Neighbours, np.ndarray]:
    """``neighbours_from_hits``, carrying each hit's ``next`` value along: int64 [b, k], -1
    where missing (all -1 where the hits carry none)."""
    counts = hits.counts  # [b]
    b = len(counts)
    if len(counts) and counts.max() > k:
        raise StoreError(f"the engine answered {int(counts.max())} hits to a search for {k}")
    token_ids = np.full((b, k), -1, dtype=np.int64)
    sq_distances = np.full((b, k), np.inf, dtype=np.float32)
    point_ids = np.full((b, k), None, dtype=object)
    next_values = np.full((b, k), -1, dtype=np.int64)
    if counts.sum():
        mask = np.arange(k)[None, :] < counts[:, None]  # [b, k], True where a hit exists
        token_ids[mask] = tokens_from_ids(hits.ids)
        point_ids[mask] = hits.ids
        dist = np.asarray(hits.scores, dtype=np.float64)  # [n]
        sq_distances[mask] = (dist * dist).astype(np.float32)
        if hits.nexts is not None:
            next_values[mask] = hits.nexts
        bad = ~np.isfinite(sq_distances) & mask  # [b, k]
        if bad.any():
            token_ids[bad], sq_distances[bad], point_ids[bad] = -1, np.inf, None
            next_values[bad] = -1
        # Rows must ascend (the nearest first): a row where a damaged vector was dropped does
        # not, nor do quantized scores that are not distances (unrescored binary codes).
        # Equal distances come in the order the engine met them, which differs between the
        # replicas of a cluster: ordered by token too, p_kNN sums them in one order always.
        later = sq_distances[:, 1:]  # [b, k-1]
        unsorted = (later <= sq_distances[:, :-1]) & np.isfinite(later)  # ties or disorder
        rows = np.flatnonzero(bad.any(axis=1) | unsorted.any(axis=1))  # [r] to reorder
        if len(rows):
            order = np.lexsort((token_ids[rows], sq_distances[rows]), axis=-1)  # [r, k]
            token_ids[rows] = np.take_along_axis(token_ids[rows], order, 1)
            sq_distances[rows] = np.take_along_axis(sq_distances[rows], order, 1)
            point_ids[rows] = np.take_along_axis(point_ids[rows], order, 1)
            next_values[rows] = np.take_along_axis(next_values[rows], order, 1)
    found = Neighbours(token_ids=token_ids, sq_distances=sq_distances, point_ids=point_ids)
    return found, next_values


# How many more neighbours than k a search asks for, so that a tie at the k-th distance is
# seen whole (see ``KnnStore.search``), and how far it goes for a longer tie.
TIE_MARGIN = 8
TIE_LIMIT = 8


def _put(out: Neighbours, rows: np.ndarray, found: Neighbours) -> None:
    """Write ``found`` [r, k] into rows ``rows`` of ``out`` [b, k]."""
    out.token_ids[rows] = found.token_ids
    out.sq_distances[rows] = found.sq_distances
    if out.point_ids is not None and found.point_ids is not None:
        out.point_ids[rows] = found.point_ids


class KnnStore(abc.ABC):
    """A (key -> next token) collection with batched Euclidean top-k search.

    Subclasses implement the primitives (``_create``, ``_search``, ``_retrieve``,
    ``_scroll``, ``_count``, ``_facet``, ``_delete``) and the lifecycle methods; what the
    two engines do alike lives here.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._meta: CollectionMeta | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def meta(self) -> CollectionMeta | None:
        """What built the collection, or None while it is still empty and new."""
        return self._meta

    @property
    def server_version(self) -> str | None:
        """The Qdrant server's version; None for embedded engines."""
        return None

    @property
    def location(self) -> str:
        """Where the collection lives, for messages (never holds a secret)."""
        return self.name

    @property
    def backend(self) -> str:
        """Which engine holds the collection: "edge" (Qdrant Edge), "local" (qdrant-client's
        local mode) or "qdrant" (a server)."""
        raise NotImplementedError

    @property
    def folder(self) -> Path | None:
        """The collection's own folder, for an engine that keeps one on local disk."""
        return None

    def download_snapshot(self, path: Path, *, on_progress: Progress = no_progress) -> str:
        """Have the engine snapshot this collection into ``path``; its sha256. Only a server
        makes snapshots of its own."""
        raise StoreError(f"{self.location} makes no snapshots of its own")

    def ensure_collection(self, meta: CollectionMeta) -> None:
        """Create the collection for ``meta``, or check that the existing one matches it."""
        if self._meta is not None:
            self.require_complete()
            self._meta.check_compatible(meta, collection=self.name)
            return
        self._create(meta)
        self._meta = meta

    def require_complete(self) -> None:
        """Raise ``StoreDamaged`` if this collection is a copy still being made."""
        if self._meta is not None and self._meta.copying:
            raise StoreDamaged(
                f"collection {self.name!r} is an unfinished copy of {self._meta.copy_of}: "
                "run the same `knnlm rebuild` or `knnlm push` again to finish it, or drop it"
            )

    def replace_meta(self, meta: CollectionMeta) -> None:
        """Rewrite the collection's record (a copy marks itself complete this way)."""
        if self._meta is None:
            raise CollectionMissing(f"collection {self.name!r} does not exist")
        self._meta.check_compatible(meta, collection=self.name)
        self._write_meta(meta)
        self._meta = meta

    @abc.abstractmethod
    def _write_meta(self, meta: CollectionMeta) -> None:
        """Replace the stored record, atomically."""

    @abc.abstractmethod
    def _create(self, meta: CollectionMeta) -> None:
        """Make the collection with ``meta.storage`` and the payload indexes."""

    @abc.abstractmethod
    def upsert(self, batch: PointBatch) -> None:
        """Write points; existing ids are overwritten, so repeating a batch is harmless."""

    @abc.abstractmethod
    def finalize(self) -> None:
        """Make every written point durable and searchable at full speed (build indexes)."""

    def flush(self) -> None:  # noqa: B027 (optional: most servers persist every write)
        """Make every written point durable (a no-op where every write already is)."""

    @abc.abstractmethod
    def drop(self) -> None:
        """Delete the whole collection, points, record and policy."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> KnnStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- policy ----------------------------------------------------------------------------

    @abc.abstractmethod
    def load_policy(self) -> dict[str, Any] | None:
        """The lambda policy saved by ``knnlm tune``, or None."""

    @abc.abstractmethod
    def save_policy(self, policy: dict[str, Any]) -> None:
        """Keep ``policy`` with the collection, replacing any earlier one."""

    # --- reads -----------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        *,
        k: int,
        options: SearchOptions | None = None,
        filter: PointFilter | None = None,
    ) -> Neighbours:
        """Top-k neighbours of each row of ``queries`` (float32 [b, dim]).

        In an exact search, neighbours tied at the k-th distance (copies of one key: repeated
        text) are taken by token, whichever of them the engine met first: every engine, and
        every replica of a cluster, then gives the same k. The engine is asked for
        ``TIE_MARGIN`` more, and a row whose tie runs past those is asked again for more (up
        to ``TIE_LIMIT`` times k). An approximate search asks for k (its ``hnsw_ef`` is the
        engine's to honour, and another graph finds other neighbours anyway).
        """
        if k < 1:
            raise ValueError(f"`k` must be positive, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) == 0 or self._meta is None:
            return Neighbours.empty(len(queries), k)
        options, filter = options or SearchOptions(), filter or PointFilter()
        if not options.exact:
            hits = self._search(queries, k=k, options=options, filter=filter)
            return neighbours_from_hits(hits, k=k)
        rows = np.arange(len(queries))  # [r], the rows still to settle
        out = Neighbours.empty(len(queries), k)
        wanted = k + TIE_MARGIN
        while True:
            hits = self._search(queries[rows], k=wanted, options=options, filter=filter)
            found = neighbours_from_hits(hits, k=wanted)  # ascending, ties ordered by token
            _put(out, rows, found.first(k))
            last = found.sq_distances[:, -1]  # [r], the farthest one asked for
            open_tie = np.isfinite(last) & (last == found.sq_distances[:, k - 1])
            if not open_tie.any() or wanted >= TIE_LIMIT * k:
                return Neighbours(out.token_ids, out.sq_distances, out.point_ids)
            rows, wanted = rows[open_tie], min(2 * wanted, TIE_LIMIT * k)

    @abc.abstractmethod
    def _search(
        self, queries: np.ndarray, *, k: int, options: SearchOptions, filter: PointFilter
    ) -> Hits:
        """The hits of every query (ids and plain L2 scores), nearest first."""

    def score_ids(
        self, queries: np.ndarray, ids: Sequence[Sequence[Any]], *, k: int
    ) -> tuple[Neighbours, np.ndarray]:
        """Each query's neighbours among the points named for it: row i of ``queries``
        (float32 [b, dim]) against the points ``ids[i]`` only, as an exact search restricted
        to them reports them (the engine's squared L2 to the original keys, whatever the
        quantization; ascending, ties by token; the k nearest, padded to k), with each
        one's ``next`` payload field.

        Pointer following scores the successors it followed this way: one batched engine
        request for all rows; no key crosses into Python, and of the payload only ``next``
        (what following them one step further needs). Ids are as ``Neighbours.point_ids``
        holds them, or their text; one that does not exist is missing from its row, a
        repeated one counts once, and an empty row stays empty.

        Returns:
            ``Neighbours`` [b, k] with point ids, and their ``next`` values int64 [b, k]
            (-1 where a point has none, or where there is no point).
        """
        if k < 1:
            raise ValueError(f"`k` must be positive, got {k}")
        if len(ids) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(ids)} rows of ids")
        b = len(queries)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        rows = np.fromiter((i for i, row in enumerate(ids) if len(row)), dtype=np.int64)  # [r]
        if len(rows) == 0 or self._meta is None:
            return Neighbours.empty(b, k), np.full((b, k), -1, dtype=np.int64)
        # a few more than k, so that a tie at the k-th distance is taken by token (``search``)
        wanted = k + TIE_MARGIN
        hits = self._score_ids(queries[rows], [ids[r] for r in rows], k=wanted)
        wide, wide_nexts = _rows_from_hits(hits, k=wanted)
        found, next_values = wide.first(k), wide_nexts[:, :k]
        if len(rows) == b:
            return found, next_values
        every = np.full((b, k), -1, dtype=np.int64)
        every[rows] = next_values
        return found.scatter(rows, b), every

    @abc.abstractmethod
    def _score_ids(self, queries: np.ndarray, ids: list[Sequence[Any]], *, k: int) -> Hits:
        """The hits of every query among its own ids (each row non-empty): ids, plain L2
        scores and ``next`` fields (-1 where absent), nearest first, from the original keys;
        one batched request that reads ``next`` only of the payload."""

    def retrieve(
        self, ids: Sequence[Any], *, with_keys: bool, with_payload: bool | list[str]
    ) -> dict[str, StoredPoint]:
        """Points by id (as ``Neighbours.point_ids`` holds them), keyed by their id string.
        ``with_payload`` may name the payload fields to read (the rest stay on disk)."""
        if not ids or self._meta is None:
            return {}
        return {
            str(r.id): StoredPoint(
                id=str(r.id),
                key=np.asarray(r.vector, dtype=np.float32) if with_keys else None,
                payload=dict(r.payload or {}) if with_payload else None,
            )
            for r in self._retrieve(list(ids), with_keys=with_keys, with_payload=with_payload)
        }

    @abc.abstractmethod
    def _retrieve(
        self, ids: list[Any], *, with_keys: bool, with_payload: bool | list[str]
    ) -> list[Any]:
        """Engine records (``.id``, ``.vector``, ``.payload``) of the points that exist."""

    def retrieve_arrays(self, ids: Sequence[Any]) -> PointArrays:
        """The ``next`` field of points by id (as ``Neighbours.point_ids`` holds them, or
        their text), in one batched lookup that reads no key.

        The bulk form of ``retrieve`` that pointer following reads with: arrays in the order
        of ``ids`` rather than an object per point, and only the ``next`` field of the
        payload. An id may repeat; one that does not exist reads as not found.
        """
        n = len(ids)
        found = np.zeros(n, dtype=bool)  # [n]
        nexts = np.full(n, -1, dtype=np.int64)  # [n]
        if n == 0 or self._meta is None:
            return PointArrays(found, nexts)
        records = self._retrieve(list(ids), with_keys=False, with_payload=[NEXT_FIELD])
        # the engine may reorder, drop the missing and merge repeats: match records by id
        record_of = {str(r.id): j for j, r in enumerate(records)}
        src = np.fromiter((record_of.get(str(i), -1) for i in ids), dtype=np.int64, count=n)
        found = src >= 0  # [n]
        src = src[found]  # [f], the record of each found id
        record_nexts = np.fromiter(
            (int_field(r.payload, NEXT_FIELD) for r in records), dtype=np.int64, count=len(records)
        )  # [m]
        nexts[found] = record_nexts[src]
        return PointArrays(found, nexts)

    def _record_keys(self, records: Sequence[Any], *, what: str) -> np.ndarray:
        """float32 [m, dim]: the keys of engine records read with their vectors, as one array;
        ``StoreDamaged`` where the engine lost one or returns the wrong shape."""
        assert self._meta is not None
        vectors = [r.vector for r in records]  # each read converts anew: read once
        missing = sum(1 for v in vectors if not isinstance(v, (list, np.ndarray)))
        if missing:  # the engine lost the key of a point it still lists
            raise StoreDamaged(
                f"collection {self.name!r} has {missing:,} points without a key in "
                f"{what}: its key files are damaged"
            )
        keys = np.asarray(vectors, dtype=np.float32)  # [m, dim]
        if keys.ndim != 2 or keys.shape[1] != self._meta.dim:
            raise StoreDamaged(
                f"collection {self.name!r} returned keys of shape {keys.shape}, "
                f"expected [n, {self._meta.dim}]"
            )
        return keys

    def scroll(
        self,
        *,
        filter: PointFilter | None = None,
        batch: int = 1024,
        offset: str | None = None,
    ) -> Iterator[tuple[PointBatch, str | None]]:
        """Every point (key and payload) in id order, ``batch`` at a time, with the offset
        at which to resume after each batch (None after the last)."""
        if self._meta is None:
            return
        while True:
            records, next_offset = self._scroll(
                filter=filter or PointFilter(), limit=batch, offset=offset
            )
            if records:
                keys = self._record_keys(records, what="one page of its points")
                points = PointBatch(
                    ids=[str(r.id) for r in records],
                    keys=keys,
                    payloads=[dict(r.payload or {}) for r in records],
                )
                offset = None if next_offset is None else str(next_offset)
                yield points, offset
            if next_offset is None or not records:
                return

    @abc.abstractmethod
    def _scroll(
        self, *, filter: PointFilter, limit: int, offset: str | None
    ) -> tuple[list[Any], Any]:
        """One page of records with vectors and payloads, and the next offset (or None)."""

    def count(self, filter: PointFilter | None = None) -> int:
        """Number of points, optionally of some domains or documents."""
        if self._meta is None:
            return 0
        return self._count(filter or PointFilter())

    @abc.abstractmethod
    def _count(self, filter: PointFilter) -> int: ...

    def domains(self) -> dict[str, int]:
        """Points per domain tag."""
        return self._facet(DOMAIN_FIELD) if self._meta is not None else {}

    def doc_counts(self) -> dict[str, int]:
        """Points per document key, for resuming an ingest with one request."""
        return self._facet(DOC_FIELD) if self._meta is not None else {}

    @abc.abstractmethod
    def _facet(self, field: str) -> dict[str, int]:
        """Exact point count per value of a keyword-indexed payload field."""

    def delete(self, filter: PointFilter) -> int:
        """Remove the points ``filter`` selects (it must select something); their number."""
        if not filter:
            raise ValueError("refusing to delete with an empty filter; use drop()")
        if self._meta is None:
            return 0
        n = self._count(filter)
        if n:
            self._delete(filter)
        return n

    @abc.abstractmethod
    def _delete(self, filter: PointFilter) -> None: ...

    # --- health ----------------------------------------------------------------------------

    def probe(self) -> None:
        """Read every stored key once (an exact search for one neighbour), so that nothing
        is written into a store whose keys cannot be read back: ``StoreDamaged`` if not."""
        if self._meta is None:
            return
        query = np.zeros((1, self._meta.dim), dtype=np.float32)
        try:
            self._search(query, k=1, options=SearchOptions(exact=True), filter=PointFilter())
        except StoreDamaged:
            raise
        except StoreError as exc:
            raise StoreDamaged(
                f"collection {self.name!r} cannot be read back ({exc}); run `knnlm check`"
            ) from exc

    def file_problems(
        self, *, deep: bool = False, on_progress: Progress = no_progress
    ) -> list[str]:
        """What is wrong with the storage files (embedded engines): files too short for the
        points they hold, files whose content differs from the checksum recorded at the last
        completed write (with ``deep`` every file is hashed, otherwise only those whose
        modification time moved; ``on_progress`` hears the bytes hashed, stage "hash"), and damage a
        ``knnlm check`` flagged. [] where the engine's files are not ours to see (a server)."""
        return []

    def content_checksums(self) -> tuple[int, int] | None:
        """Files and bytes under content checksum; None where none are kept."""
        return None

    def flag_damage(self, findings: list[str]) -> None:  # noqa: B027 (optional)
        """Keep what ``knnlm check`` found wrong, so that readers refuse the store until a
        check finds it sound; [] clears it. Where nothing is kept beside the points (a
        server), a no-op."""

    def flagged(self) -> list[str]:
        """What the last ``knnlm check`` found wrong and kept (``flag_damage``)."""
        return []

    def quick_problems(self) -> list[str]:
        """What a cheap look finds wrong, one phrase each: an unfinished copy, short key or
        id files, counts that disagree or fell since the last completed write. Reads no
        key; ``knnlm check`` looks at everything."""
        if self._meta is None:
            return []
        problems = []
        if self._meta.copying:
            problems.append(f"an unfinished copy of {self._meta.copy_of}")
        try:
            problems += [f"`knnlm check` found: {text}" for text in self.flagged()]
            problems += self.file_problems()
            exact, engine = self.count(), self.engine_points()
            if exact != engine and self.engine_count_is_exact:
                problems.append(f"{exact:,} points counted, the engine reports {engine:,}")
            recorded = (self.load_state() or {}).get("points")
            if isinstance(recorded, int) and exact < recorded:
                problems.append(f"{recorded - exact:,} points lost since the last completed write")
        except StoreError as exc:
            problems.append(str(exc))
        return problems

    def require_sound(self) -> None:
        """Raise ``StoreDamaged`` (naming ``knnlm check``) if ``quick_problems`` finds any:
        no answer comes from a store that might be damaged."""
        self.require_complete()
        problems = self.quick_problems()
        if problems:
            raise StoreDamaged(
                f"collection {self.name!r} is damaged ({'; '.join(problems)}); "
                "run `knnlm check` for the whole story"
            )

    @abc.abstractmethod
    def indexed_fields(self) -> set[str]:
        """Payload fields that carry an index (``check`` wants domain and doc)."""

    def load_state(self) -> dict[str, Any] | None:
        """What the last completed write recorded (the point count), where kept."""
        return None

    def save_state(self) -> None:  # noqa: B027 (optional: only embedded stores keep one)
        """Record a completed write (after a flush), where the store keeps such a record."""

    def engine_storage(self) -> dict[str, Any] | None:
        """The storage settings as the engine reports them, where it can (a server)."""
        return None

    # Whether ``engine_points`` is exact: a server's collection info counts approximately
    # (in a cluster it lags behind a replica that recovers), so only embedded engines
    # compare it with the exact count.
    engine_count_is_exact = True

    def engine_points(self) -> int:
        """The engine's own point total, as its info reports (``check`` compares it)."""
        return self.count()
