"""Datastore backends. ``open_store`` is the only place that chooses one."""

from __future__ import annotations

from typing import Protocol

from knn_store.errors import ConfigError
from knn_store.store.base import (
    CollectionMeta,
    KnnStore,
    Neighbours,
    PointBatch,
    PointFilter,
    StoredPoint,
)
from knn_store.store.config import SearchOptions, StorageConfig, StoreLocation


class SupportsStoreLocation(Protocol):
    def store_location(self) -> StoreLocation: ...


__all__ = [
    "CollectionMeta",
    "KnnStore",
    "Neighbours",
    "PointBatch",
    "PointFilter",
    "SearchOptions",
    "StorageConfig",
    "StoreLocation",
    "StoredPoint",
    "open_store",
]


def open_store(
    location: StoreLocation | SupportsStoreLocation,
    *,
    create: bool = False,
    collection: str | None = None,
) -> KnnStore:
    """Open ``collection`` (default: the location's) where ``location`` says: a
    ``StoreLocation``, or anything with a ``store_location()`` (``KnnlmSettings``).

    With ``create=False`` a missing collection raises ``CollectionMissing``; with
    ``create=True`` it is made on the first ``ensure_collection``.
    """
    where = location if isinstance(location, StoreLocation) else location.store_location()
    name = collection or where.collection
    local = where.backend in ("edge", "local")
    if local and where.data_dir.exists() and not where.data_dir.is_dir():
        raise ConfigError(f"--data-dir {where.data_dir} is a file, not a folder")
    if where.backend == "edge":
        from knn_store.store.edge import EdgeStore

        return EdgeStore(where.data_dir / name, create=create, search_threads=where.search_threads)
    from knn_store.store.client import QdrantClientStore

    if where.backend == "local":
        return QdrantClientStore.local(
            where.data_dir / "qdrant-local", collection=name, create=create, retries=where.retries
        )
    if where.backend != "qdrant" or not where.url:
        raise ConfigError(f"backend {where.backend!r} needs a server URL (--url)")
    return QdrantClientStore.server(
        where.url,
        collection=name,
        api_key=where.api_key,
        prefer_grpc=where.prefer_grpc,
        grpc_port=where.grpc_port,
        ca_cert=where.ca_cert,
        timeout=where.timeout,
        create=create,
        retries=where.retries,
        search_threads=where.search_threads,
        allow_insecure_api_key=where.allow_insecure_api_key,
    )
