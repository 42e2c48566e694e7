"""Datastore backends. ``open_store`` is the only place that chooses one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knn_store.store.base import CollectionMeta, KnnStore, Neighbours, PointBatch

if TYPE_CHECKING:
    from knn_store.settings import KnnlmSettings

__all__ = ["CollectionMeta", "KnnStore", "Neighbours", "PointBatch", "open_store"]


def open_store(settings: KnnlmSettings, *, create: bool = False) -> KnnStore:
    """Open ``settings.collection`` on the configured backend.

    With ``create=False`` a missing collection raises ``CollectionMissing``; with
    ``create=True`` it is made on the first ``ensure_collection``.
    """
    if settings.backend == "edge":
        from knn_store.store.edge import EdgeStore

        return EdgeStore(settings.data_dir / settings.collection, create=create)
    from knn_store.store.client import QdrantServerStore

    assert settings.url is not None  # the settings validator guarantees it
    return QdrantServerStore(
        settings.url,
        collection=settings.collection,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        prefer_grpc=settings.prefer_grpc,
        timeout=settings.timeout,
        create=create,
    )
