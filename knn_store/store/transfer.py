"""Copying points between collections without running the LM: ``knnlm rebuild`` (the same
engine, new storage settings) and ``knnlm push`` (an embedded collection to a server).

Points are read in id order and upserted with their ids, so a copy repeated or resumed from
an earlier offset adds nothing twice. A small checkpoint file remembers where a copy got to;
at the end the counts of both sides must agree.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from knn_store.errors import StoreError
from knn_store.store.base import KnnStore, PointFilter
from knn_store.store.config import StorageConfig


@dataclass(frozen=True)
class CopyReport:
    points: int  # points the source holds (under the filter)
    copied: int  # points sent in this run
    resumed_from: str | None  # the offset a previous run had reached
    policy: bool  # a tuned policy was copied
    seconds: float


def copy_collection(
    source: KnnStore,
    target: KnnStore,
    *,
    storage: StorageConfig | None = None,
    filter: PointFilter | None = None,
    checkpoint_dir: Path | None = None,
    batch: int = 1024,
    on_batch: Callable[[int], None] | None = None,
) -> CopyReport:
    """Copy ``source``'s points (those ``filter`` selects), record and tuned policy into
    ``target``, created with ``storage`` (default: the source's).

    Args:
        checkpoint_dir: where to keep the resume point (None: start from the beginning).
        on_batch: called with the number of points of each batch sent (progress bars).
    """
    if source.meta is None:
        raise StoreError(f"collection {source.name!r} is empty: nothing to copy")
    flt = filter or PointFilter()
    meta = replace(source.meta, storage=storage or source.meta.storage)
    if target.meta is not None:
        target.meta.check_storage(meta.storage.to_dict(), collection=target.name)
    target.ensure_collection(meta)
    policy = source.load_policy()
    if policy is not None:
        target.save_policy(policy)

    started = time.perf_counter()
    state = _Checkpoint(checkpoint_dir, source, target, flt)
    offset = state.load()
    copied = 0
    pages = source.scroll(filter=flt, batch=batch, offset=offset)
    for sends, (points, next_offset) in enumerate(pages, start=1):
        target.upsert(points)
        copied += len(points)
        if on_batch is not None:
            on_batch(len(points))
        if sends % 32 == 0 or next_offset is None:
            target.flush()  # lets the engine trim its write-ahead log as it goes
            state.save(next_offset)
    target.finalize()
    expected, have = source.count(flt), target.count(flt)
    if have != expected:
        raise StoreError(
            f"copy ended with {have:,} points in {target.name!r} but {source.name!r} holds "
            f"{expected:,}; run it again"
        )
    state.clear()
    return CopyReport(expected, copied, offset, policy is not None, time.perf_counter() - started)


class _Checkpoint:
    """The scroll offset a copy reached, in a JSON file named after both ends and the filter."""

    def __init__(
        self, folder: Path | None, source: KnnStore, target: KnnStore, flt: PointFilter
    ) -> None:
        key = json.dumps(
            [source.location, source.name, target.location, target.name, flt.domains, flt.docs]
        )
        name = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        self.path = None if folder is None else folder / f"copy-{name}.json"

    def load(self) -> str | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            return json.loads(self.path.read_text()).get("offset")
        except (OSError, ValueError):
            return None  # an unreadable checkpoint only costs a copy from the start

    def save(self, offset: str | None) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"offset": offset}))
        tmp.replace(self.path)

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
