"""The embedded backend: a Qdrant Edge shard on local disk (the default).

Long for a reason: it owns every byte of its collection on disk (the records, the write
state, the checks of its files before the engine opens them), which a server keeps to itself.

Layout of one collection, ``<data_dir>/<collection>/``:

- ``meta.json``: what built it (model, key type, storage settings); written last at
  creation, atomically, so its presence means "a valid collection";
- ``policy.json``: the tuned lambda policy, if any;
- ``state.json``: the record of the last completed write: its point count, and the size,
  modification time and content checksum of every segment file (``file_sums``), verified
  before the engine opens them; or, while a write is under way, that it is;
- ``shard/``: Qdrant's segments and write-ahead log. Every acknowledged upsert is in the
  WAL, so a killed ingest loses nothing it was told was written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

from knn_store.errors import (
    CollectionMissing,
    StoreDamaged,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    first_line,
)
from knn_store.progress import Progress, no_progress
from knn_store.store import file_sums
from knn_store.store.base import (
    DOMAIN_FIELD,
    FACET_LIMIT,
    INDEXED_FIELDS,
    NEXT_FIELD,
    CollectionMeta,
    Hits,
    KnnStore,
    PointBatch,
    PointFilter,
    int_field,
)
from knn_store.store.config import TURBO_BITS, SearchOptions, StorageConfig
from knn_store.store.disk import SPARE_BYTES, require_free_space
from knn_store.store.records import seal, sealing, unseal

T = TypeVar("T")

META_FILE = "meta.json"
POLICY_FILE = "policy.json"
STATE_FILE = "state.json"
SHARD_DIR = "shard"
# What opening needs free beyond what its files may still fill (writes leave
# disk.SPARE_BYTES): see EdgeStore._require_space.
OPEN_SPARE_BYTES = 4 * 2**20


class EdgeStore(KnnStore):
    """A collection in an embedded Qdrant Edge shard at ``path`` (one folder per collection).

    Args:
        path: the collection's folder.
        create: if False, a missing collection raises ``CollectionMissing``; otherwise it
            is made by the first ``ensure_collection``.
        search_threads: threads of the shard's search pool (None: one per CPU).

    Only one process may hold a shard at a time; a second gets ``StoreLocked``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        search_threads: int | None = None,
    ) -> None:
        self.path = Path(path).absolute()
        super().__init__(self.path.name)
        self.search_threads = search_threads
        self._shard: qe.EdgeShard | None = None
        self._lock: int | None = None
        self._writing = False  # whether state.json says a write is under way
        self._completed: int | None = None  # points at a completed write, recorded at close
        self._found_at_open: list[str] = []  # files unlike their checksums before the engine
        self._take_lock(create)
        try:
            self._open(create)
        except BaseException:
            self._release_lock()
            raise

    def _take_lock(self, create: bool) -> None:
        """One holder per collection, across processes: Qdrant Edge lets two processes
        create the same shard at once, and both would write to it. The lock is a file
        beside the collection's folder, so it exists before the folder does."""
        lock = self.path.parent / f".{self.path.name}.lock"
        if not create and not self.path.is_dir():
            return  # nothing to hold: opening it will say it is missing
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return  # a read-only folder: nothing can be written there anyway
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLocked(
                f"collection {self.name!r} in {self.path.parent} is in use by another process "
                "(another knnlm command?); wait for it to finish"
            ) from None
        self._lock = fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            if not self.path.exists():  # nothing was made (or it was dropped): no trace
                (self.path.parent / f".{self.path.name}.lock").unlink(missing_ok=True)
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def _open(self, create: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreDamaged(
                f"{self.path} is a file, not a collection folder; move it away or use "
                "another --collection"
            )
        meta_file = self.path / META_FILE
        if meta_file.is_file():
            self._meta = _read_meta(meta_file)
            # Before the engine opens them: it would extend short key files with zeros and
            # answer from those, and the evidence would be gone.
            problems = segment_file_problems(self.path / SHARD_DIR / "segments")
            # Files unlike their checksums are seen before the engine opens them too (it
            # rewrites some, such as flag files, from what it read), but refused by readers
            # (`require_sound`), so that `knnlm check` can still open the store and say more.
            if not problems:
                with contextlib.suppress(StoreDamaged):  # an unreadable record: said later
                    self._found_at_open = self._content_problems(deep=False)
            if problems:
                raise StoreDamaged(
                    f"collection {self.name!r} is damaged ({'; '.join(problems)}); it was "
                    f"not opened: restore a snapshot (`knnlm snapshot restore`), or remove "
                    f"{self.path} and ingest again"
                )
            self._shard = self._open_shard(self._meta)
        elif not create:
            raise CollectionMissing(
                f"no collection {self.name!r} in {self.path.parent}; run `knnlm ingest` first"
            )

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def backend(self) -> str:
        return "edge"

    @property
    def folder(self) -> Path | None:
        return self.path

    # --- lifecycle -------------------------------------------------------------------------

    def _create(self, meta: CollectionMeta) -> None:
        if meta.storage.clustered:
            raise StoreError(
                "shard number, replication and write consistency factors apply to Qdrant "
                "server collections; "
                "the embedded store is one shard"
            )
        self._require_space("create a collection")
        if (self.path / SHARD_DIR).exists():
            self._discard_unfinished_shard()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        self._shard = self._open_shard(meta, create=True)
        self._begin_write()
        for field in INDEXED_FIELDS:
            self._call(
                "index payload",
                self._shard.update,
                qe.UpdateOperation.create_field_index(
                    field, qe.KeywordIndexParams(is_tenant=field == DOMAIN_FIELD)
                ),
            )
        self._call("flush", self._shard.flush)
        # meta.json last, written atomically: its presence means "a valid collection".
        _write_atomically(self.path / META_FILE, json.dumps(seal(meta.to_dict()), indent=2))

    def _write_meta(self, meta: CollectionMeta) -> None:
        self._require_shard()
        _write_atomically(self.path / META_FILE, json.dumps(seal(meta.to_dict()), indent=2))

    def _discard_unfinished_shard(self) -> None:
        """A shard without meta.json is a creation cut short; if it holds no points, redo it."""
        try:
            shard = qe.EdgeShard.load(str(self.path / SHARD_DIR))
            points = shard.count(qe.CountRequest(exact=True))
            shard.close()
        except Exception as exc:  # never delete what could not be read
            raise StoreDamaged(
                f"{self.path / SHARD_DIR} has no {META_FILE} and cannot be read "
                f"({first_line(exc)}); it was left as it is: remove the folder yourself if "
                "it holds nothing you need, or use another --collection"
            ) from exc
        if points:
            raise StoreDamaged(
                f"{self.path / SHARD_DIR} holds {points} points but no {META_FILE}; "
                "remove the folder or use another --collection"
            )
        shutil.rmtree(self.path / SHARD_DIR)

    def _open_shard(self, meta: CollectionMeta, *, create: bool = False) -> qe.EdgeShard:
        shard_path = self.path / SHARD_DIR
        config = _edge_config(meta, self.search_threads)
        if not create:
            # Loading replays the write-ahead log into the segments and may fill the holes
            # of their sparse memory-mapped files (it does on tmpfs).
            wal = _allocated(shard_path / "wal")
            holes = _holes(shard_path / "segments")
            self._require_space("open it", wal + holes, spare=OPEN_SPARE_BYTES)
        try:
            if create:
                return qe.EdgeShard.create(str(shard_path), config)
            return qe.EdgeShard.load(str(shard_path), config)
        except Exception as exc:  # qdrant_edge raises plain exceptions
            raise _open_error(shard_path, exc, create=create) from exc

    def upsert(self, batch: PointBatch) -> None:
        shard = self._require_shard()
        # the log and the segments each hold a float32 copy of the key, and the payload
        self._require_space("write points", len(batch) * (batch.keys.shape[1] * 8 + 1024))
        points = [
            qe.Point(pid, key, payload)
            for pid, key, payload in zip(batch.ids, batch.keys, batch.payloads, strict=True)
        ]
        self._begin_write()
        self._call("write points", shard.update, qe.UpdateOperation.upsert_points(points))

    def flush(self) -> None:
        """Persist segments; this also lets the WAL drop what they now hold."""
        if self._shard is not None:
            self._call("flush", self._shard.flush)

    def finalize(self) -> None:
        if self._shard is None:
            return
        # the optimizer may write every segment anew before it drops the old ones
        self._require_space("build the index", _allocated(self.path / SHARD_DIR / "segments"))
        self._call("build the index", self._shard.optimize)
        self.flush()
        self.save_state()

    def save_state(self) -> None:
        """Record a completed write (call it after a flush): its point count now, so that
        ``check`` can tell points lost since; every segment file's content checksum when
        the shard closes where this store wrote, as the engine writes the last of them
        then."""
        if self._shard is None:
            return
        self._completed = self.count()
        if not self._writing:  # nothing written since it opened: the files are final
            self._record_files()
            return
        self._write_state(points=self._completed, writing=True)

    def _begin_write(self, points: int | None = None) -> None:
        """Say in state.json that a write is under way, before its first change (with the
        point count at its end, where known): the files will differ from their checksums
        until the shard closes after ``save_state``, and a write cut short leaves that said
        (readers then have no checksums to verify)."""
        self._completed = None
        if self._writing and points is None:
            return
        recorded = (self.load_state() or {}).get("points", 0)
        self._write_state(points=recorded if points is None else points, writing=True)
        self._writing = True

    def _record_files(self) -> None:
        """After the shard closed on a completed write: the files' content checksums."""
        if self._completed is None:
            return
        sums = file_sums.record(self.path / SHARD_DIR / "segments")
        self._write_state(points=self._completed, files=sums)
        self._completed = None
        self._writing = False

    def _write_state(self, **state: Any) -> None:
        """Write state.json sealed, keeping what ``knnlm check`` flagged: only a check
        that finds the store sound clears that."""
        previous = self.load_state()
        if previous and "flagged" in previous and "flagged" not in state:
            state["flagged"] = previous["flagged"]
        _write_atomically(self.path / STATE_FILE, json.dumps(seal(state)))

    def load_state(self) -> dict[str, Any] | None:
        raw = _read_json(self.path / STATE_FILE)
        if raw is None:
            return None
        return unseal(raw, what=f"record of the last write ({STATE_FILE})")

    def flag_damage(self, findings: list[str]) -> None:
        """Keep what ``knnlm check`` found wrong in state.json, so that every reader refuses
        the store until a check finds it sound ([] clears it)."""
        try:
            state = self.load_state()
        except StoreDamaged:
            return  # an unreadable record: check's own report says so
        if state is None or state.get("flagged", []) == findings:
            return
        state.pop("flagged", None)
        with contextlib.suppress(StoreError):  # a read-only folder: check's report says it
            _write_atomically(
                self.path / STATE_FILE,
                json.dumps(seal({**state, "flagged": findings} if findings else state)),
            )

    def drop(self) -> None:
        self._close_shard()  # the lock stays held: the folder goes, the name stays ours
        shutil.rmtree(self.path, ignore_errors=True)
        self._meta = None
        self._writing, self._completed, self._found_at_open = False, None, []

    def close(self) -> None:
        try:
            self._close_shard()
            self._record_files()
        finally:
            self._release_lock()

    def _close_shard(self) -> None:
        if self._shard is not None:
            try:
                self._shard.close()
            finally:
                self._shard = None

    def load_policy(self) -> dict[str, Any] | None:
        path = self.path / POLICY_FILE
        if not path.is_file():
            return None  # none saved; a file that holds null is damage (unseal says so)
        return unseal(_read_json(path), what=f"tuned policy ({POLICY_FILE})")

    def save_policy(self, policy: dict[str, Any]) -> None:
        self._require_shard()
        _write_atomically(self.path / POLICY_FILE, json.dumps(seal(policy), indent=1))

    def _require_space(self, what: str, needed: int = 0, *, spare: int = SPARE_BYTES) -> None:
        """Refuse to ``what`` unless ``needed`` bytes and ``spare`` more are free.

        Qdrant Edge writes through memory maps: a write that finds the disk full kills the
        process with SIGBUS, with no error and no message, and on a full disk even opening
        the store (which replays its log) does. Stopping while space is left turns that
        into an error after which the store still opens and a rerun resumes.
        """
        require_free_space(
            self.path,
            needed,
            what,
            spare=spare,
            why="Qdrant Edge cannot survive a disk that fills up mid-write",
            then="run the same command again",
        )

    def _require_shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise CollectionMissing(f"collection {self.name!r} is empty; run `knnlm ingest` first")
        return self._shard

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run an engine call; its plain exceptions become ``StoreError``."""
        try:
            return fn(*args)
        except Exception as exc:
            raise StoreError(
                f"Qdrant Edge store {self.path} failed to {what}: {first_line(exc)}"
            ) from exc

    # --- primitives ------------------------------------------------------------------------

    def _search(
        self, queries: np.ndarray, *, k: int, options: SearchOptions, filter: PointFilter
    ) -> Hits:
        shard = self._require_shard()
        params = qe.SearchParams(
            hnsw_ef=options.ef(k), exact=options.exact, quantization=self._quantization(options)
        )
        flt = _filter(filter)
        requests = [
            qe.QueryRequest(
                limit=k,
                query=qe.Query.Nearest(row),
                with_payload=False,  # the token is in the id: no payload fetch
                with_vector=False,
                params=params,
                filter=flt,
            )
            for row in queries
        ]
        results = self._call("search", shard.query_batch, qe.QueryBatchRequest(requests))
        return Hits.from_rows(
            [[p.id for p in hits] for hits in results],
            [[p.score for p in hits] for hits in results],
        )

    def _score_ids(self, queries: np.ndarray, ids: list[Sequence[Any]], *, k: int) -> Hits:
        shard = self._require_shard()
        exact = SearchOptions(exact=True)
        params = qe.SearchParams(exact=True, quantization=self._quantization(exact))
        requests = [
            qe.QueryRequest(
                limit=min(k, len(row)),
                query=qe.Query.Nearest(query),
                filter=qe.Filter(must=[qe.HasIdCondition(set(row))]),
                with_payload=[NEXT_FIELD],
                with_vector=False,
                params=params,
            )
            for query, row in zip(queries, ids, strict=True)
        ]
        results = self._call("score points", shard.query_batch, qe.QueryBatchRequest(requests))
        return Hits.from_rows(
            [[p.id for p in hits] for hits in results],
            [[p.score for p in hits] for hits in results],
            [[int_field(p.payload, NEXT_FIELD) for p in hits] for hits in results],
        )

    def _quantization(self, options: SearchOptions) -> qe.QuantizationSearchParams | None:
        assert self._meta is not None
        if self._meta.storage.quantization == "none":
            return None
        # an exact search reads the original keys: exact distances, whatever the settings
        return qe.QuantizationSearchParams(
            ignore=options.exact,
            rescore=options.rescores(self._meta.storage),
            oversampling=options.oversampling,
        )

    def _retrieve(
        self, ids: list[Any], *, with_keys: bool, with_payload: bool | list[str]
    ) -> list[Any]:
        shard = self._require_shard()
        return self._call("read points", shard.retrieve, ids, with_payload, with_keys)

    def _scroll(
        self, *, filter: PointFilter, limit: int, offset: str | None
    ) -> tuple[list[Any], Any]:
        request = qe.ScrollRequest(
            offset=offset, limit=limit, filter=_filter(filter), with_payload=True, with_vector=True
        )
        return self._call("read points", self._require_shard().scroll, request)

    def _count(self, filter: PointFilter) -> int:
        request = qe.CountRequest(exact=True, filter=_filter(filter))
        return self._call("count points", self._require_shard().count, request)

    def _facet(self, field: str) -> dict[str, int]:
        request = qe.FacetRequest(key=field, limit=FACET_LIMIT, exact=True)
        try:
            facets = self._call(f"count points per {field}", self._require_shard().facet, request)
        except StoreError as exc:
            # Every collection is made with this index: without it, segments were lost.
            if field not in self.indexed_fields():
                raise StoreDamaged(
                    f"collection {self.name!r} has lost its payload index on {field!r} (files "
                    "under shard/segments deleted?); it is damaged: remove its folder and "
                    "ingest again"
                ) from exc
            raise
        return {str(hit.value): hit.count for hit in facets.hits}

    def _delete(self, filter: PointFilter) -> None:
        # The recorded count goes down first: killed in between, check sees more points than
        # recorded (fine), never fewer (which it reports as lost).
        self._begin_write(points=self.count() - self._count(filter))
        operation = qe.UpdateOperation.delete_points_by_filter(_filter(filter))
        self._call("delete points", self._require_shard().update, operation)
        self.flush()
        self.save_state()

    def file_problems(
        self, *, deep: bool = False, on_progress: Progress = no_progress
    ) -> list[str]:
        segments = self.path / SHARD_DIR / "segments"
        problems = segment_file_problems(segments)
        seen = self._found_at_open
        content = self._content_problems(deep=deep, on_progress=on_progress)
        return problems + seen + [p for p in content if p not in seen]

    def _content_problems(self, *, deep: bool, on_progress: Progress = no_progress) -> list[str]:
        """Segment files unlike the checksums of the last completed write, or no
        checksums where there should be."""
        segments = self.path / SHARD_DIR / "segments"
        problems: list[str] = []
        state = self.load_state()
        if state is None:
            if self._meta is not None and not sealing():
                problems.append(
                    f"its record of the last write ({STATE_FILE}) is missing; "
                    "`knnlm check --seal-records` records one for a collection you know to be "
                    "sound"
                )
            return problems
        sums = state.get("files")
        if isinstance(sums, dict):
            found = file_sums.verify(segments, sums, deep=deep, on_progress=on_progress)
            problems += [f"segment file {text}" for text in found.problems]
            if found.moved and not problems and self._lock is not None:
                # the same content under a new time: hash it again only if it moves again
                # (in a read-only folder, every time)
                with contextlib.suppress(StoreError):
                    self._write_state(**{**state, "files": found.refreshed(sums)})
        elif not state.get("writing") and not sealing():
            problems.append(
                f"its record of the last write ({STATE_FILE}) holds no content checksums; "
                "`knnlm check --seal-records` records them for a collection you know to be sound"
            )
        return problems

    def flagged(self) -> list[str]:
        try:
            flagged = (self.load_state() or {}).get("flagged", [])
        except StoreDamaged:
            return []  # an unreadable record: its own problem, told by `file_problems`
        return [str(text) for text in flagged] if isinstance(flagged, list) else [str(flagged)]

    def content_checksums(self) -> tuple[int, int] | None:
        """Files and bytes under content checksum, None where none are recorded (a write
        under way, or a record older than them)."""
        state = self.load_state() or {}
        sums = state.get("files")
        if not isinstance(sums, dict):
            return None
        return len(sums), file_sums.total_bytes(sums)

    def indexed_fields(self) -> set[str]:
        return set(self._call("read shard info", self._require_shard().info).payload_schema)

    def engine_points(self) -> int:
        return self._call("read shard info", self._require_shard().info).points_count


# --- helpers -------------------------------------------------------------------------------


def _edge_config(meta: CollectionMeta, search_threads: int | None) -> qe.EdgeConfig:
    """The shard configuration for a collection's storage settings."""
    s: StorageConfig = meta.storage
    # Cached: held in RAM (page cache, loaded eagerly); Cold: memory-mapped, read on demand.
    vectors_memory = qe.Memory.Cold if s.vectors_on_disk else qe.Memory.Cached
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(
            size=meta.dim,
            distance=qe.Distance.Euclid,
            datatype=qe.VectorStorageDatatype.Float16 if s.datatype == "float16" else None,
            quantization_config=_quantization_config(s.quantization),
            memory=vectors_memory,
        ),
        hnsw_config=qe.HnswIndexConfig(
            m=s.hnsw_m,
            ef_construct=s.hnsw_ef_construct,
            # KB: a segment below it is scanned; with an indexing threshold, the same one
            full_scan_threshold=s.indexing_threshold_kb or 10_000,
            memory=qe.Memory.Cold if s.index_on_disk else qe.Memory.Cached,
        ),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=s.indexing_threshold_kb)
        if s.indexing_threshold_kb is not None
        else None,
        max_search_threads=search_threads,
    )


def _quantization_config(kind: str) -> Any:
    """The quantized copy kept in RAM (Pinned) next to the originals, or None."""
    if kind == "none":
        return None
    if kind == "int8":
        return qe.ScalarQuantizationConfig(
            type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned
        )
    if kind == "binary":
        return qe.BinaryQuantizationConfig(memory=qe.Memory.Pinned)
    bits = {
        "1": qe.TurboQuantBitSize.Bits1,
        "1.5": qe.TurboQuantBitSize.Bits1_5,
        "2": qe.TurboQuantBitSize.Bits2,
        "4": qe.TurboQuantBitSize.Bits4,
        "8": qe.TurboQuantBitSize.Bits8,
    }[TURBO_BITS[kind]]
    return qe.TurboQuantQuantizationConfig(bits=bits, memory=qe.Memory.Pinned)


def _filter(flt: PointFilter) -> qe.Filter | None:
    if not flt:
        return None
    return qe.Filter(
        must=[
            qe.FieldCondition(key=key, match=qe.MatchAny(values))
            for key, values in flt.conditions()
        ]
    )


def _open_error(shard_path: Path, exc: Exception, *, create: bool) -> StoreError:
    """Name the real cause of a failed open: missing files, a corrupt WAL, or a lock."""
    text = first_line(exc)
    if create:
        return StoreUnavailable(
            f"cannot create Qdrant Edge store {shard_path}: {text}; is the disk writable?"
        )
    if any(s in text for s in ("os error 13", "os error 30", "Permission denied", "Read-only")):
        folder = shard_path.parent
        return StoreError(
            f"the collection folder {folder} is not writable, and Qdrant Edge opens its files "
            "for writing even to read them: make it writable (`chmod -R u+w` it), or copy the "
            f"data folder {folder.parent} somewhere writable and pass that as --data-dir"
        )
    if "WouldBlock" in text or "lock" in text.lower():
        return StoreLocked(
            f"Qdrant Edge store {shard_path} is in use by another process (another knnlm "
            "command?); wait for it to finish"
        )
    if not shard_path.is_dir():
        return StoreDamaged(
            f"the collection's shard folder {shard_path} is missing; the collection is "
            "damaged: remove its folder and ingest again"
        )
    if "WAL" in text:
        return StoreDamaged(
            f"the write-ahead log of {shard_path} is unreadable ({text}); the collection is "
            "damaged: remove its folder and ingest again"
        )
    return StoreDamaged(f"cannot open Qdrant Edge store {shard_path}: {text}")


def _read_meta(path: Path) -> CollectionMeta:
    data = _read_json(path)
    if data is None:
        raise CollectionMissing(f"{path} vanished while opening")
    CollectionMeta.check_version(data)
    return CollectionMeta.from_dict(unseal(data, what=f"collection record ({path.name})"))


_ITEM_BYTES = {"float32": 4, "float16": 2, "uint8": 1}


def segment_file_problems(segments: Path) -> list[str]:
    """Key and id files too short for the points their segment holds, one phrase each: the
    damage a truncated or emptied file does without the engine noticing (it answers from
    what is left). Reads sizes and two small headers, never the keys themselves."""
    problems: list[str] = []
    if not segments.is_dir():
        return problems
    for segment in sorted(p for p in segments.iterdir() if p.is_dir()):
        config = _read_json(segment / "segment.json")
        if not isinstance(config, dict):
            problems.append(f"segment {segment.name} has no readable segment.json")
            continue
        try:
            vectors = config["config"]["vector_data"][""]
            dim, kind = int(vectors["size"]), str(vectors["storage_type"])
            item = _ITEM_BYTES[str(vectors.get("datatype") or "float32").lower()]
        except (KeyError, TypeError, ValueError):
            problems.append(f"segment {segment.name} has an unreadable segment.json")
            continue
        versions = [
            segment / name
            for name in ("id_tracker.versions", "mutable_id_tracker.versions")
            if (segment / name).is_file()
        ]
        ids = versions[0].stat().st_size // 8 if versions else 0  # one u64 per point
        storage = segment / "vector_storage"
        if kind == "Mmap":
            matrix = storage / "matrix.dat"
            need, have = ids * dim * item, matrix.stat().st_size if matrix.is_file() else 0
            if have < need:
                problems.append(
                    f"segment {segment.name}: matrix.dat holds {have:,} bytes, "
                    f"{need:,} needed for {ids:,} points"
                )
        elif kind == "ChunkedMmap" and (storage / "vectors").is_dir():
            status = storage / "vectors" / "status.dat"
            count = int.from_bytes(status.read_bytes()[:8], "little") if status.is_file() else 0
            chunks = sum(p.stat().st_size for p in (storage / "vectors").glob("chunk_*.mmap"))
            if chunks < count * dim * item:
                problems.append(
                    f"segment {segment.name}: key chunks hold {chunks:,} bytes, "
                    f"{count * dim * item:,} needed for {count:,} points"
                )
            if count < ids:
                problems.append(
                    f"segment {segment.name}: {count:,} keys stored for {ids:,} point ids"
                )
    return problems


def _read_json(path: Path) -> Any:
    """A JSON file's content, None if absent; unreadable or invalid JSON is damage."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreDamaged(f"cannot read {path}: {exc}") from exc


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _allocated(folder: Path) -> int:
    """Bytes the files under ``folder`` take on disk (their memory maps are sparse)."""
    return _sum_stat(folder, lambda st: st.st_blocks * 512)


def _holes(folder: Path) -> int:
    """Bytes of the files under ``folder`` not on disk yet: what writing them may take."""
    return _sum_stat(folder, lambda st: max(st.st_size - st.st_blocks * 512, 0))


def _sum_stat(folder: Path, measure: Callable[[os.stat_result], int]) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += measure(os.stat(os.path.join(root, name)))
            except OSError:  # gone meanwhile
                continue
    return total
