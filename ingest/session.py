"""The write side's composition root: ``open_ingest`` builds a ready ``IngestWorker`` from
settings (the model, its windows, the collection checked against the flags), as
``knn_store.open_session`` does for the query side. The CLI only calls it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ingest.worker import IngestWorker
from knn_store.progress import Progress, no_progress
from knn_store.session import windows_for
from knn_store.settings import KnnlmSettings


@contextmanager
def open_ingest(
    settings: KnnlmSettings,
    *,
    shard: tuple[int, int] = (0, 1),
    on_progress: Progress = no_progress,
) -> Iterator[IngestWorker]:
    """An ingest worker writing ``settings.domain`` into ``settings.collection`` (made on
    the first write with the settings' storage). An existing collection must be complete
    (not a copy in progress), sound, and match the storage flags given explicitly."""
    from knn_store import load_language_model, open_store

    lm = load_language_model(settings)
    window, stride = windows_for(settings, lm)
    with open_store(settings, create=True) as store:
        if store.meta is not None:
            store.require_sound()
            store.meta.check_storage(settings.storage_overrides(), collection=store.name)
        yield IngestWorker(
            lm,
            store,
            domain=settings.domain,
            window=window,
            stride=stride,
            batch_size=settings.batch_size,
            upsert_batch=settings.upsert_batch,
            storage=settings.storage(),
            shard=shard,
            on_progress=on_progress,
        )
