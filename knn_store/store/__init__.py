"""Datastore backends. ``open_store`` is the only place that chooses one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knn_store.errors import ConfigError
from knn_store.store.base import (
    CollectionMeta,
    KnnStore,
    Neighbours,
    PointBatch,
    PointFilter,
    StoredPoint,
)
from knn_store.store.config import SearchOptions, StorageConfig

if TYPE_CHECKING:
    from knn_store.settings import KnnlmSettings

__all__ = [
    "CollectionMeta",
    "KnnStore",
    "Neighbours",
    "PointBatch",
    "PointFilter",
    "SearchOptions",
    "StorageConfig",
    "StoredPoint",
    "open_store",
]


def open_store(
    settings: KnnlmSettings, *, create: bool = False, collection: str | None = None
) -> KnnStore:
    """Open ``collection`` (default ``settings.collection``) on the configured backend.

    With ``create=False`` a missing collection raises ``CollectionMissing``; with
    ``create=True`` it is made on the first ``ensure_collection``.
    """
    name = collection or settings.collection
    if settings.backend in ("edge", "local"):
        data_dir = settings.data_dir
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigError(f"--data-dir {data_dir} is a file, not a folder")
    if settings.backend == "edge":
        from knn_store.store.edge import EdgeStore

        return EdgeStore(
            settings.data_dir / name, create=create, search_threads=settings.search_threads
        )
    from knn_store.store.client import QdrantClientStore

    if settings.backend == "local":
        return QdrantClientStore.local(
            settings.data_dir / "qdrant-local",
            collection=name,
            create=create,
            retries=settings.retries,
        )
    assert settings.url is not None  # the settings validator guarantees it
    return QdrantClientStore.server(
        settings.url,
        collection=name,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        prefer_grpc=settings.prefer_grpc,
        timeout=settings.timeout,
        create=create,
        retries=settings.retries,
        search_threads=settings.search_threads,
        allow_insecure_api_key=settings.allow_insecure_api_key,
    )
