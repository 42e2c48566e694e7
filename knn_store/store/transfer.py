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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from knn_store.errors import ConfigError, StoreDamaged, StoreError
from knn_store.progress import Counter, Progress, no_progress
from knn_store.store.base import NEXT_FIELD, KnnStore, PointBatch, PointFilter
from knn_store.store.config import StorageConfig
from knn_store.store.point_ids import id_parts


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
    into_existing: bool = False,
    on_progress: Progress = no_progress,
    successors: bool = False,
) -> CopyReport:
    """Copy ``source``'s points (those ``filter`` selects), record and tuned policy into
    ``target``, created with ``storage`` (default: the source's).

    A new target is marked as a copy in progress (``CollectionMeta.copy_of``) until its
    counts agree with the source's; only then does it get the tuned policy and lose the mark,
    so no reader takes half a copy for a collection. A target that exists and is not an
    interrupted copy of the same source is refused unless ``into_existing``: then the points
    are added to it, and its own record and policy stay.

    Args:
        checkpoint_dir: where to keep the resume point (None: start from the beginning).
        on_progress: hears the points sent (stage "copy", out of the source's count).
        successors: give every point the ``next`` field (its successor's value), which
            pointer following needs; the copy's record then says so (``meta.successors``).
    """
    if source.meta is None:
        raise StoreError(f"collection {source.name!r} is empty: nothing to copy")
    source.require_sound()  # what every reader checks: a copy must not launder damage
    if source.name == target.name and _same_place(source.location, target.location):
        raise ConfigError(f"the copy's target is its source, {source.name!r} at {source.location}")
    flt = filter or PointFilter()
    origin = f"{source.name!r} at {source.location}"
    meta = replace(
        source.meta,
        storage=storage or source.meta.storage,
        copy_of=origin,
        copying=True,
        successors=source.meta.successors or successors,
    )
    existing = target.meta
    ours = existing is not None and existing.copy_of == origin  # an earlier run's target
    if existing is not None and not ours:
        if existing.copying or not into_existing:
            held = ", ".join(sorted(target.domains())) or "no points"
            what = (
                f"an unfinished copy of {existing.copy_of}"
                if existing.copying
                else f"not a copy of {origin} (it holds domains: {held})"
            )
            adding = ", ".join(flt.domains or sorted(source.domains()))
            raise StoreError(
                f"collection {target.name!r} at {target.location} already exists and is "
                f"{what}; choose another target name, or pass --into-existing to add "
                f"{origin}'s domains ({adding}) to it"
            )
        existing.check_compatible(meta, collection=target.name)
    elif existing is not None:
        existing.check_storage(meta.storage.to_dict(), collection=target.name)
        if not existing.copying and target.count(flt) == source.count(flt):
            return CopyReport(target.count(flt), 0, None, False, 0.0)  # already complete
    else:
        target.ensure_collection(meta)
    started = time.perf_counter()
    state = _Checkpoint(checkpoint_dir, source, target, flt)
    offset = state.load()
    copied = 0
    counter = Counter(on_progress, "copy", source.count(flt))
    pages = source.scroll(filter=flt, batch=batch, offset=offset)
    if successors:
        pages = with_successor_tokens(pages)
    for sends, (points, next_offset) in enumerate(pages, start=1):
        _require_finite(points, source)
        target.upsert(points)
        copied += len(points)
        counter.add(len(points))
        if sends % 32 == 0 or next_offset is None:
            target.flush()  # lets the engine trim its write-ahead log as it goes
            state.save(next_offset)
    target.finalize()
    # Counted over the source's domains: a target it was added into holds others too, and
    # may already have held points of these domains.
    counted = flt if flt.domains else replace(flt, domains=tuple(source.domains()))
    expected, have = source.count(counted), target.count(counted)
    if have < expected or (have != expected and not into_existing):
        raise StoreError(
            f"copy ended with {have:,} points in {target.name!r} but {source.name!r} holds "
            f"{expected:,}; run it again"
        )
    policy = None
    assert target.meta is not None
    if target.meta.copy_of == origin:  # a copy of its own: complete it
        policy = source.load_policy()
        if policy is not None:
            target.save_policy(policy)
        if target.meta.copying:
            target.replace_meta(replace(target.meta, copying=False))
    state.clear()
    return CopyReport(expected, copied, offset, policy is not None, time.perf_counter() - started)


def _require_finite(points: PointBatch, source: KnnStore) -> None:
    """Refuse keys that are not numbers (``knnlm check`` flags them): a copy would carry
    them into a collection that looks sound."""
    bad = ~np.isfinite(points.keys).all(axis=1)  # [n]
    if bad.any():
        raise StoreDamaged(
            f"collection {source.name!r} holds keys that are not finite numbers (point "
            f"{points.ids[int(np.argmax(bad))]} and {int(bad.sum()) - 1:,} more in one page); "
            "nothing damaged is copied: run `knnlm check`"
        )


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


def _same_place(a: str, b: str) -> bool:
    """Two locations name the same place: the same URL, or the same folder however it is
    spelled."""
    if a == b:
        return True
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def with_successor_tokens(
    pages: Iterator[tuple[PointBatch, str | None]],
) -> Iterator[tuple[PointBatch, str | None]]:
    """The same pages, each point's payload given ``NEXT_FIELD``: the value of the point at
    the same document's next position, or -1 where there is none.

    Pages come in id order, and an id begins with (document hash, position), so a point's
    successor is the point right after it: in the same page, or first in the next one (held
    back one page to see it). Where a successor is missing (the document's end, or a
    filtered copy), the field is -1 and pointer following stops there. Pure id arithmetic,
    no LM.
    """
    held: tuple[PointBatch, str | None] | None = None
    for page in pages:
        if held is not None:
            yield _link(held[0], page[0]), held[1]
        held = page
    if held is not None:
        yield _link(held[0], None), held[1]


def _link(points: PointBatch, following: PointBatch | None) -> PointBatch:
    """``points`` with ``NEXT_FIELD`` set from the ids of ``points`` and the first point of
    ``following``."""
    ids = points.ids + (following.ids[:1] if following is not None else [])
    doc, position, token = id_parts(ids)  # [n + 1] or [n]
    n = len(points)
    same = np.zeros(n, dtype=bool)  # [n], whether point i + 1 is point i's successor
    if len(ids) > 1:
        tail = min(n, len(ids) - 1)
        same[:tail] = (doc[1 : tail + 1] == doc[:tail]) & (
            position[1 : tail + 1] == position[:tail] + 1
        )
    nxt = np.where(same, np.append(token[1:], -1)[:n], -1)  # [n]
    payloads = [{**p, NEXT_FIELD: int(t)} for p, t in zip(points.payloads, nxt, strict=True)]
    return PointBatch(points.ids, points.keys, payloads)
