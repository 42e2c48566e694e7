"""The server backend: a Qdrant server (docker compose, Qdrant Cloud) through qdrant-client.

``url=":memory:"`` or a filesystem path selects qdrant-client's local mode, a numpy scan
meant for tests: it warns past 20,000 points. What built the collection is kept in Qdrant's
collection metadata, so every client of the server sees it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

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

_META_KEY = "knnlm"
_POLICY_KEY = "knnlm_policy"


class QdrantServerStore:
    """A collection on a Qdrant server, or in qdrant-client's local mode.

    Args:
        url: ``http(s)://host:port``, ``":memory:"``, or a folder for local mode.
        collection: collection name.
        api_key: the server's API key (never logged).
        prefer_grpc: use gRPC (port 6334); REST bodies are capped at 32 MB, gRPC's are not.
        timeout: request timeout in seconds.
        create: if False, a missing collection raises ``CollectionMissing``.
    """

    def __init__(
        self,
        url: str,
        *,
        collection: str,
        api_key: str | None = None,
        prefer_grpc: bool = False,
        timeout: int = 60,
        create: bool = True,
    ) -> None:
        from qdrant_client import QdrantClient

        self.name = collection
        self.url = url
        self._local = url == ":memory:" or "://" not in url
        try:
            if url == ":memory:":
                self._client = QdrantClient(location=":memory:")
            elif self._local:
                Path(url).mkdir(parents=True, exist_ok=True)
                self._client = QdrantClient(path=url)
            else:
                # No version probe at connect: its failure would only add a warning, and the
                # first real call below reports an unreachable server properly.
                self._client = QdrantClient(
                    url=url,
                    api_key=api_key,
                    prefer_grpc=prefer_grpc,
                    timeout=timeout,
                    check_compatibility=False,
                )
            exists = self._client.collection_exists(collection)
        except Exception as exc:
            raise StoreUnavailable(
                f"cannot reach Qdrant at {url}: {_first_line(exc)}; is the server running "
                "(`docker compose up -d`), and are the URL and API key right?"
            ) from exc
        self._meta: CollectionMeta | None = None
        self._policy: dict[str, Any] | None = None
        if exists:
            info = self._call("read collection info", self._client.get_collection, collection)
            self._policy = (info.config.metadata or {}).get(_POLICY_KEY)
            raw = (info.config.metadata or {}).get(_META_KEY)
            if raw is None:
                raise StoreError(
                    f"collection {collection!r} exists but was not made by knnlm; "
                    "use another --collection"
                )
            self._meta = CollectionMeta.from_dict(raw)
        elif not create:
            raise CollectionMissing(
                f"no collection {collection!r} at {url}; run `knnlm ingest` first"
            )

    @property
    def meta(self) -> CollectionMeta | None:
        return self._meta

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a client call; no answer is StoreUnavailable, an error answer StoreError."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            error = StoreUnavailable if _is_transport_error(exc) else StoreError
            raise error(f"Qdrant at {self.url} failed to {what}: {_first_line(exc)}") from exc

    def ensure_collection(self, meta: CollectionMeta) -> None:
        from qdrant_client import models

        if self._meta is not None:
            self._meta.check_compatible(meta, collection=self.name)
            return
        self._call(
            "create the collection",
            self._client.create_collection,
            self.name,
            vectors_config=models.VectorParams(size=meta.dim, distance=models.Distance.EUCLID),
            # Bulk load first, index afterwards: finalize() turns HNSW on.
            hnsw_config=models.HnswConfigDiff(m=0),
            metadata={_META_KEY: meta.to_dict()},
        )
        for field in (DOMAIN_FIELD, DOC_FIELD):
            schema = models.KeywordIndexParams(
                type=models.KeywordIndexType.KEYWORD, is_tenant=field == DOMAIN_FIELD
            )
            with warnings.catch_warnings():  # local mode ignores payload indexes, and says so
                warnings.simplefilter("ignore")
                self._call(
                    "index payload", self._client.create_payload_index, self.name, field, schema
                )
        self._meta = meta

    def upsert(self, batch: PointBatch) -> None:
        from qdrant_client import models

        self._call(
            "upsert points",
            self._client.upsert,
            self.name,
            points=models.Batch(
                ids=batch.ids, vectors=batch.keys.tolist(), payloads=batch.payloads
            ),
            wait=True,
        )

    def search(
        self,
        queries: np.ndarray,
        *,
        k: int,
        exact: bool,
        hnsw_ef: int,
        domains: list[str] | None = None,
    ) -> Neighbours:
        from qdrant_client import models

        # Local mode always scans exactly and warns about search params it cannot use.
        params = None if self._local else models.SearchParams(hnsw_ef=max(hnsw_ef, k), exact=exact)
        flt = None
        if domains:
            flt = models.Filter(
                must=[models.FieldCondition(key=DOMAIN_FIELD, match=models.MatchAny(any=domains))]
            )
        requests = [
            models.QueryRequest(
                query=row.tolist(),
                limit=k,
                params=params,
                filter=flt,
                with_payload=False,
                with_vector=False,
            )
            for row in np.asarray(queries, dtype=np.float32)
        ]
        results = self._call(
            "search", self._client.query_batch_points, self.name, requests=requests
        )
        return neighbours_from_hits(
            [[p.id for p in r.points] for r in results],
            [[p.score for p in r.points] for r in results],
            k=k,
        )

    def retrieve(
        self, ids: list[Any], *, with_keys: bool, with_payload: bool
    ) -> dict[str, StoredPoint]:
        records = self._call(
            "read points",
            self._client.retrieve,
            self.name,
            ids=[str(i) for i in ids],
            with_payload=with_payload,
            with_vectors=with_keys,
        )
        return {
            str(r.id): StoredPoint.from_record(r, with_keys=with_keys, with_payload=with_payload)
            for r in records
        }

    def load_policy(self) -> dict[str, Any] | None:
        return self._policy

    def save_policy(self, policy: dict[str, Any]) -> None:
        if self._meta is None:
            raise CollectionMissing(f"collection {self.name!r} is empty; run `knnlm ingest` first")
        # Qdrant merges metadata keys, so this leaves the collection's own record alone.
        self._call(
            "save the policy",
            self._client.update_collection,
            self.name,
            metadata={_POLICY_KEY: policy},
        )
        self._policy = policy

    def count(self, *, doc: str | None = None) -> int:
        from qdrant_client import models

        if self._meta is None:
            return 0
        flt = None
        if doc is not None:
            flt = models.Filter(
                must=[models.FieldCondition(key=DOC_FIELD, match=models.MatchValue(value=doc))]
            )
        return self._call(
            "count", self._client.count, self.name, count_filter=flt, exact=True
        ).count

    def domains(self) -> dict[str, int]:
        if self._meta is None:
            return {}
        facets = self._call(
            "facet", self._client.facet, self.name, key=DOMAIN_FIELD, limit=10_000, exact=True
        )
        return {str(hit.value): hit.count for hit in facets.hits}

    def finalize(self) -> None:
        from qdrant_client import models

        if self._meta is None or self._local:
            return
        self._call(
            "enable HNSW",
            self._client.update_collection,
            self.name,
            hnsw_config=models.HnswConfigDiff(m=16),
        )

    def close(self) -> None:
        self._client.close()


def _is_transport_error(exc: BaseException) -> bool:
    """True when the server never answered (refused, timed out), over REST or gRPC."""
    import grpc
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException

    if isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError)):
        return True
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
