"""The embedded backend: a Qdrant Edge shard on local disk (the default).

Layout of one collection: ``<data_dir>/<collection>/meta.json`` (what built it) and
``<data_dir>/<collection>/shard/`` (Qdrant's segments and write-ahead log). Every
acknowledged upsert is in the WAL, so a killed ingest loses nothing it was told was written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

from knn_store.errors import CollectionMissing, StoreError, StoreUnavailable
from knn_store.store.base import (
    DOC_FIELD,
    DOMAIN_FIELD,
    CollectionMeta,
    Neighbours,
    PointBatch,
    StoredPoint,
    neighbours_from_hits,
)

T = TypeVar("T")

META_FILE = "meta.json"
POLICY_FILE = "policy.json"
SHARD_DIR = "shard"


class EdgeStore:
    """A collection in an embedded Qdrant Edge shard at ``path`` (one folder per collection).

    With ``create=False`` a missing collection raises ``CollectionMissing``; otherwise it is
    made by the first ``ensure_collection``. Only one process may hold a shard at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path).absolute()
        self.name = self.path.name
        self._shard: qe.EdgeShard | None = None
        self._meta: CollectionMeta | None = None
        meta_file = self.path / META_FILE
        if meta_file.exists():
            try:
                self._meta = CollectionMeta.from_dict(json.loads(meta_file.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise StoreError(f"cannot read {meta_file}: {exc}") from exc
            self._shard = self._open_shard(load=True)
        elif not create:
            raise CollectionMissing(
                f"no collection {self.name!r} in {self.path.parent}; run `knnlm ingest` first"
            )

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def meta(self) -> CollectionMeta | None:
        return self._meta

    def ensure_collection(self, meta: CollectionMeta) -> None:
        if self._meta is not None:
            self._meta.check_compatible(meta, collection=self.name)
            return
        if (self.path / SHARD_DIR).exists():
            self._discard_unfinished_shard()
        self.path.mkdir(parents=True, exist_ok=True)
        self._shard = self._open_shard(load=False, dim=meta.dim)
        for field in (DOMAIN_FIELD, DOC_FIELD):
            self._shard.update(
                qe.UpdateOperation.create_field_index(
                    field, qe.KeywordIndexParams(is_tenant=field == DOMAIN_FIELD)
                )
            )
        self._shard.flush()
        # meta.json last, written atomically: its presence means "a valid collection".
        _write_atomically(self.path / META_FILE, meta.to_json())
        self._meta = meta

    def load_policy(self) -> dict[str, Any] | None:
        path = self.path / POLICY_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def save_policy(self, policy: dict[str, Any]) -> None:
        self._require_shard()
        _write_atomically(self.path / POLICY_FILE, json.dumps(policy, indent=1))

    def _discard_unfinished_shard(self) -> None:
        """A shard without meta.json is a creation cut short; if it holds no points, redo it."""
        shard = self._open_shard(load=True)
        points = shard.count(qe.CountRequest(exact=True))
        shard.close()
        if points:
            raise StoreError(
                f"{self.path / SHARD_DIR} holds {points} points but no {META_FILE}; "
                "remove the folder or use another --collection"
            )
        shutil.rmtree(self.path / SHARD_DIR)

    def _open_shard(self, *, load: bool, dim: int = 0) -> qe.EdgeShard:
        shard_path = str(self.path / SHARD_DIR)
        try:
            if load:
                return qe.EdgeShard.load(shard_path)
            config = qe.EdgeConfig(
                vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Euclid)
            )
            return qe.EdgeShard.create(shard_path, config)
        except Exception as exc:  # qdrant_edge raises plain exceptions
            hint = "is another knnlm process using it?" if load else "is the disk writable?"
            raise StoreUnavailable(
                f"cannot open Qdrant Edge store {shard_path}: {exc}; {hint}"
            ) from exc

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Run a shard operation; engine failures (disk full, WAL damage) become StoreError."""
        try:
            return fn(*args)
        except Exception as exc:
            raise StoreError(f"Qdrant Edge store {self.path} failed to {what}: {exc}") from exc

    def _require_shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise CollectionMissing(f"collection {self.name!r} is empty; run `knnlm ingest` first")
        return self._shard

    def finalize(self) -> None:
        shard = self._require_shard()
        self._call("flush", shard.flush)
        self._call("build its index", shard.optimize)  # HNSW for segments past the threshold

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    # --- writes ----------------------------------------------------------------------------

    def upsert(self, batch: PointBatch) -> None:
        shard = self._require_shard()
        points = [
            qe.Point(pid, key, payload)
            for pid, key, payload in zip(batch.ids, batch.keys, batch.payloads, strict=True)
        ]
        self._call("write points", shard.update, qe.UpdateOperation.upsert_points(points))

    # --- reads -----------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        *,
        k: int,
        exact: bool,
        hnsw_ef: int,
        domains: list[str] | None = None,
    ) -> Neighbours:
        shard = self._require_shard()
        params = qe.SearchParams(hnsw_ef=max(hnsw_ef, k), exact=exact)
        flt = _domain_filter(domains)
        requests = [
            qe.QueryRequest(
                limit=k,
                query=qe.Query.Nearest(row),
                with_payload=False,  # the token is in the id: no payload fetch
                with_vector=False,
                params=params,
                filter=flt,
            )
            for row in np.ascontiguousarray(queries, dtype=np.float32)
        ]
        results = self._call("search", shard.query_batch, qe.QueryBatchRequest(requests))
        return neighbours_from_hits(
            [[p.id for p in hits] for hits in results],
            [[p.score for p in hits] for hits in results],
            k=k,
        )

    def retrieve(
        self, ids: list[Any], *, with_keys: bool, with_payload: bool
    ) -> dict[str, StoredPoint]:
        shard = self._require_shard()
        records = self._call("read points", shard.retrieve, list(ids), with_payload, with_keys)
        return {
            str(r.id): StoredPoint.from_record(r, with_keys=with_keys, with_payload=with_payload)
            for r in records
        }

    def count(self, *, doc: str | None = None) -> int:
        if self._shard is None:
            return 0
        flt = None
        if doc is not None:
            flt = qe.Filter(must=[qe.FieldCondition(key=DOC_FIELD, match=qe.MatchValue(doc))])
        return self._call(
            "count points", self._shard.count, qe.CountRequest(exact=True, filter=flt)
        )

    def domains(self) -> dict[str, int]:
        if self._shard is None:
            return {}
        request = qe.FacetRequest(key=DOMAIN_FIELD, limit=10_000, exact=True)
        facets = self._call("count domains", self._shard.facet, request)
        return {str(hit.value): hit.count for hit in facets.hits}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _domain_filter(domains: list[str] | None) -> qe.Filter | None:
    if not domains:
        return None
    return qe.Filter(must=[qe.FieldCondition(key=DOMAIN_FIELD, match=qe.MatchAny(domains))])
