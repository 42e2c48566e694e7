"""Backups: a collection in one file, and back (``knnlm snapshot create|list|restore``).

A snapshot is a tar file, ``<collection>-<UTC time>.knnlm-snapshot.tar``, kept under
``<data_dir>/.snapshots/<collection>/`` unless written elsewhere. Its first member,
``knnlm-snapshot.json``, is the manifest: the format version, the collection's name, its
points per domain, the time it was taken, the collection's record and tuned policy, and the
size and sha256 of every other member. Those are, by the kind of store it was taken from:

- ``edge``: the collection's folder (``meta.json``, ``policy.json``, ``state.json``,
  ``shard/``) under ``collection/``, taken after a flush. A collection in qdrant-client's
  local mode is copied into such a folder first;
- ``server``: ``qdrant.snapshot``, the Qdrant server's own snapshot of the collection: its
  points, its configuration and its metadata, which hold the record and the policy.

Qdrant's memory-mapped files are mostly preallocated zeros, so every member is stored sparse
(GNU tar's sparse format 1.0, which GNU tar and Python's tarfile read) and restored sparse.

A restore checks every member's checksum, then opens what it restored where nothing else
can see it yet and compares the record, the policy and the points per domain with the
manifest; only then does the collection appear under its name. An embedded collection is
unpacked into a hidden folder next to its place and renamed into it (a replaced one is moved
aside first, and removed once the new one is in place). A server recovers a ``server``
snapshot itself (Qdrant's upload recovery); an ``edge`` snapshot is copied point by point into
a staging collection there, which the server then snapshots and recovers under the target's
name. A ``server`` snapshot restored onto Qdrant Edge goes through Qdrant Edge's own
shard-snapshot unpacking.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from knn_store.errors import (
    CollectionMissing,
    ConfigError,
    KnnlmError,
    StoreDamaged,
    StoreError,
    StoreLocked,
    StoreUnavailable,
)
from knn_store.progress import Counter, Progress, no_progress
from knn_store.store.base import CollectionMeta, KnnStore
from knn_store.store.records import seal

SUFFIX = ".knnlm-snapshot.tar"
MANIFEST = "knnlm-snapshot.json"
FORMAT = "knnlm-snapshot"
VERSION = 1
SNAPSHOTS_DIR = ".snapshots"
EDGE_PREFIX = "collection/"  # the members of an ``edge`` snapshot: the collection's folder
SERVER_MEMBER = "qdrant.snapshot"  # the member of a ``server`` snapshot
KINDS = ("edge", "server")
_BLOCK = 1 << 16  # zero runs shorter than this are stored as data
_ZEROS = bytes(_BLOCK)
_SPARE_BYTES = 32 * 2**20  # free space a snapshot or a restore leaves on the disk
_MAX_MANIFEST = 64 * 2**20
_MAX_SPARSE = 8**11 - 2**20  # a sparse member's stored size must fit the ustar size field


@dataclass(frozen=True)
class SnapshotManifest:
    """What a snapshot holds, and how to tell that it arrived intact."""

    kind: str  # "edge" or "server"
    collection: str
    points: int
    domains: dict[str, int]
    created: str  # ISO 8601, UTC
    record: dict[str, Any]  # the collection's CollectionMeta
    policy: dict[str, Any] | None
    source: dict[str, Any]  # backend, location (never a secret), server version
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> size, sha256
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "kind": self.kind,
            "collection": self.collection,
            "points": self.points,
            "domains": self.domains,
            "created": self.created,
            "record": self.record,
            "policy": self.policy,
            "source": self.source,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> SnapshotManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreDamaged(f"{where} is not a knnlm snapshot (no knnlm manifest)")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise StoreError(
                f"{where} has snapshot format {version}, newer than this knnlm reads "
                f"({VERSION}); upgrade knnlm"
            )
        try:
            manifest = cls(
                kind=str(data["kind"]),
                collection=str(data["collection"]),
                points=int(data["points"]),
                domains={str(k): int(v) for k, v in data["domains"].items()},
                created=str(data["created"]),
                record=dict(data["record"]),
                policy=None if data.get("policy") is None else dict(data["policy"]),
                source=dict(data.get("source") or {}),
                files={
                    str(name): {"size": int(f["size"]), "sha256": str(f["sha256"])}
                    for name, f in data["files"].items()
                },
                version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreDamaged(f"{where} has an incomplete or invalid manifest ({exc})") from exc
        if manifest.kind not in KINDS:
            raise StoreDamaged(f"{where} is of an unknown kind {manifest.kind!r}")
        for name in manifest.files:
            _check_member_name(name, manifest.kind, where)
        return manifest


@dataclass(frozen=True)
class Snapshot:
    """A snapshot file and its manifest."""

    path: Path
    size: int  # bytes of the file
    manifest: SnapshotManifest

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class RestoreReport:
    snapshot: Snapshot
    collection: str
    location: str
    points: int
    domains: dict[str, int]
    policy: bool  # a tuned policy came back with it
    replaced: bool  # a collection of that name was replaced
    how: str  # what restored it, for messages
    seconds: float


# --- create ----------------------------------------------------------------------------------


def snapshot_folder(data_dir: Path, collection: str) -> Path:
    """Where ``create`` keeps the snapshots of ``collection`` by default."""
    return data_dir / SNAPSHOTS_DIR / collection


def create_snapshot(
    store: KnnStore,
    *,
    folder: Path,
    output: Path | None = None,
    on_progress: Progress = no_progress,
) -> Snapshot:
    """Write a snapshot of ``store``'s collection into ``folder`` (or to ``output``: a file, or
    a folder to write into) and return it. A damaged collection is refused."""
    from knn_store.store.client import QdrantClientStore
    from knn_store.store.edge import EdgeStore

    if store.meta is None:
        raise CollectionMissing(f"collection {store.name!r} is empty: nothing to snapshot")
    _require_sound(store)
    dest = _destination(store.name, folder, output)
    backend = "edge" if isinstance(store, EdgeStore) else "local"
    if isinstance(store, QdrantClientStore) and not store.local:
        backend = "qdrant"
    base = {
        "collection": store.name,
        "points": store.count(),
        "domains": store.domains(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "record": store.meta.to_dict(),
        "policy": store.load_policy(),
        "source": {
            "backend": backend,
            "location": store.location,
            "server_version": store.server_version,
        },
    }
    if isinstance(store, EdgeStore):
        store.flush()
        manifest = SnapshotManifest(kind="edge", **base)
        _write_snapshot(dest, manifest, _edge_members(store.path), on_progress)
    elif backend == "local":
        from knn_store.store.transfer import copy_collection

        # qdrant-client's local mode has no snapshots: copy it into an embedded collection
        with (
            tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent) as tmp,
            EdgeStore(Path(tmp) / store.name) as edge,
        ):
            copy_collection(store, edge, on_progress=on_progress)
            edge.replace_meta(store.meta)  # the record itself, not one of a copy
            manifest = SnapshotManifest(kind="edge", **base)
            _write_snapshot(dest, manifest, _edge_members(edge.path), on_progress)
    else:
        assert isinstance(store, QdrantClientStore)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
            downloaded = Path(tmp) / SERVER_MEMBER
            store.download_snapshot(downloaded, on_progress=on_progress)
            _require_every_shard(downloaded, store.name)
            if store.count() != base["points"] or store.domains() != base["domains"]:
                raise StoreError(
                    f"points of {store.name!r} were written while the snapshot was taken; "
                    "take it again when no ingest is running"
                )
            manifest = SnapshotManifest(kind="server", **base)
            _write_snapshot(dest, manifest, [(downloaded, SERVER_MEMBER)], on_progress)
    return read_snapshot(dest)


def _require_every_shard(path: Path, collection: str) -> None:
    """A server node snapshots the shards it holds, and only names the others: refuse a
    snapshot that lacks the data of some shard."""
    try:
        with tarfile.open(path, "r:") as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError) as exc:
        raise StoreError(
            f"the server's snapshot of {collection!r} cannot be read: {_first_line(exc)}"
        ) from exc
    shards = {n.split("/")[0] for n in names if n.split("/")[0].isdigit()}
    missing = [s for s in shards if not any(n.startswith(f"{s}/segments/") for n in names)]
    if missing or not shards:
        raise StoreError(
            f"the node of the server that answered holds {len(shards) - len(missing)} of the "
            f"{len(shards)} shards of {collection!r}; its snapshot would lack the others' "
            "points: knnlm snapshots collections whose shards all live on one node"
        )


def _require_sound(store: KnnStore) -> None:
    from knn_store.store.check import check_collection

    report = check_collection(store, full=False)
    if not report.ok:
        problems = "; ".join(f"{f.what}: {f.detail}" for f in report.problems)
        raise StoreDamaged(
            f"collection {store.name!r} is damaged ({problems}); a snapshot would keep the "
            "damage: run `knnlm check`"
        )


def _destination(collection: str, folder: Path, output: Path | None) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    name = f"{collection}-{stamp}{SUFFIX}"
    if output is not None:
        if output.is_dir():
            folder = output
        else:
            if output.exists():
                raise ConfigError(f"--output {output} exists; choose another file")
            if not output.parent.is_dir():
                raise ConfigError(f"--output {output}: the folder {output.parent} does not exist")
            return output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {folder}: {exc.strerror or exc}") from exc
    dest, n = folder / name, 1
    while dest.exists() or dest.with_name(dest.name + ".partial").exists():
        dest, n = folder / f"{collection}-{stamp}-{n}{SUFFIX}", n + 1
    return dest


def _edge_members(path: Path) -> list[tuple[Path, str]]:
    """The files of an embedded collection's folder, as members of an ``edge`` snapshot."""
    members = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.name.endswith(".tmp"):  # an atomic write cut short: not part of the state
            continue
        members.append((file, EDGE_PREFIX + file.relative_to(path).as_posix()))
    return members


# --- list and find ---------------------------------------------------------------------------


def read_snapshot(path: Path) -> Snapshot:
    """The snapshot at ``path`` with its manifest (its members are checked by a restore)."""
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"no snapshot file {path}")
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise StoreDamaged(f"{where} is not a knnlm snapshot (no knnlm manifest)")
            if first.size > _MAX_MANIFEST:
                raise StoreDamaged(f"{where} has a manifest of {first.size:,} bytes; damaged?")
            reader = tar.extractfile(first)
            assert reader is not None
            data = json.loads(reader.read())
        size = path.stat().st_size
    except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
        raise StoreDamaged(f"{where} is not a readable knnlm snapshot: {_first_line(exc)}") from exc
    return Snapshot(path, size, SnapshotManifest.from_dict(data, where=where))


def list_snapshots(folders: list[Path]) -> tuple[list[Snapshot], list[tuple[Path, str]]]:
    """The snapshots in ``folders``, oldest first, and the files there that cannot be read
    as one (with the reason)."""
    found: list[Snapshot] = []
    unreadable: list[tuple[Path, str]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            try:
                found.append(read_snapshot(path))
            except KnnlmError as exc:
                unreadable.append((path, str(exc)))
    found.sort(key=lambda s: (s.manifest.created, s.path.stat().st_mtime_ns, s.name))
    return found, unreadable


def find_snapshot(ref: str, folders: list[Path]) -> Snapshot:
    """A snapshot given as a file path, or by its name (with or without the suffix) in one
    of ``folders``."""
    path = Path(ref).expanduser()
    if path.is_file():
        return read_snapshot(path)
    if path.name == ref:  # a bare name: look it up
        for folder in folders:
            for candidate in (folder / ref, folder / f"{ref}{SUFFIX}"):
                if candidate.is_file():
                    return read_snapshot(candidate)
    places = ", ".join(str(f) for f in folders) or "the snapshots folder"
    raise ConfigError(
        f"no snapshot {ref!r}: not a file, nor a snapshot name in {places}; "
        "`knnlm snapshot list` shows them"
    )


# --- restore ---------------------------------------------------------------------------------


def restore_snapshot(
    snapshot: Snapshot,
    target: str,
    *,
    backend: str,
    data_dir: Path,
    open_collection: Callable[[str], KnnStore] | None = None,
    replace: bool = False,
    on_progress: Progress = no_progress,
) -> RestoreReport:
    """Restore ``snapshot`` as collection ``target`` of ``backend`` ("edge", "local" or
    "qdrant").

    ``data_dir`` holds embedded collections and the temporary files of a restore;
    ``open_collection(name)`` opens a collection of a local-mode or server backend (made on
    its first write if missing). An existing ``target`` is refused unless ``replace``.
    """
    if not target or "/" in target or target.startswith("."):
        raise ConfigError(f"{target!r} is not a collection name")
    CollectionMeta.from_dict(snapshot.manifest.record)  # a record this knnlm cannot read
    started = time.perf_counter()
    if backend == "edge":
        how, location, replaced = _restore_edge(snapshot, target, data_dir, replace, on_progress)
    else:
        if open_collection is None:
            raise ValueError("restoring onto a local-mode or server backend needs open_collection")
        restore = _restore_local if backend == "local" else _restore_server
        how, location, replaced = restore(
            snapshot, target, data_dir, open_collection, replace, on_progress
        )
    m = snapshot.manifest
    return RestoreReport(
        snapshot=snapshot,
        collection=target,
        location=location,
        points=m.points,
        domains=m.domains,
        policy=m.policy is not None,
        replaced=replaced,
        how=how,
        seconds=time.perf_counter() - started,
    )


def _restore_edge(
    snapshot: Snapshot, target: str, data_dir: Path, replace: bool, on_progress: Progress
) -> tuple[str, str, bool]:
    path = data_dir / target
    _mkdir(data_dir)
    with _collection_lock(path):  # no knnlm command opens it until it is in place
        if path.exists() and not path.is_dir():
            raise StoreDamaged(f"{path} is a file, not a collection folder; move it away")
        exists = path.exists()
        if exists and not replace:
            raise StoreError(
                f"collection {target!r} exists in {data_dir}; pass --replace to replace it (it "
                "is removed only once the snapshot is in place), or restore with "
                "--to-collection NEW"
            )
        return _swap_in(snapshot, path, exists, on_progress)


def _swap_in(
    snapshot: Snapshot, path: Path, exists: bool, on_progress: Progress
) -> tuple[str, str, bool]:
    data_dir, target = path.parent, path.name
    for stale in data_dir.glob(f".{target}.restoring-*"):  # left by a restore that was killed
        shutil.rmtree(stale, ignore_errors=True)
    token = uuid.uuid4().hex[:8]
    staging = data_dir / f".{target}.restoring-{token}"  # hidden: never taken for a collection
    try:
        _mkdir(staging)
        store = _unpacked_edge(snapshot, staging, target, on_progress)
        store.close()
        old = data_dir / f".{target}.replaced-{token}" if exists else None
        if old is not None:
            os.rename(path, old)
        try:
            os.rename(staging / target, path)
        except OSError as exc:
            if old is not None:
                os.rename(old, path)
            raise StoreError(f"cannot move the restored collection into {path}: {exc}") from exc
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _how(snapshot, "unpacked"), str(path), exists


def _restore_local(
    snapshot: Snapshot,
    target: str,
    data_dir: Path,
    open_collection: Callable[[str], KnnStore],
    replace: bool,
    on_progress: Progress,
) -> tuple[str, str, bool]:
    _mkdir(data_dir)
    with open_collection(target) as dest:
        exists = dest.meta is not None
        if exists and not replace:
            raise StoreError(
                f"collection {target!r} exists at {dest.location}; pass --replace to replace "
                "it, or restore with --to-collection NEW"
            )
        with (
            tempfile.TemporaryDirectory(prefix=".restore-", dir=data_dir) as tmp,
            _unpacked_edge(snapshot, Path(tmp), target, on_progress) as edge,
        ):
            if exists:
                dest.drop()
            try:
                _copy_back(edge, dest, snapshot, on_progress)
            except BaseException:
                dest.drop()  # nothing half-restored stays behind
                raise
        return _how(snapshot, "copied"), dest.location, exists


def _restore_server(
    snapshot: Snapshot,
    target: str,
    data_dir: Path,
    open_collection: Callable[[str], KnnStore],
    replace: bool,
    on_progress: Progress,
) -> tuple[str, str, bool]:
    from knn_store.store.client import QdrantClientStore

    m = snapshot.manifest
    staging_name = f"{target}.restoring"
    _mkdir(data_dir)
    # A handle on the server (and, for an ``edge`` snapshot, the staging collection): the
    # target itself may be unreadable, and is only ever replaced by the server's recovery.
    with open_collection(staging_name) as staging:
        assert isinstance(staging, QdrantClientStore) and not staging.local
        exists = staging.collection_exists(target)
        if exists and not replace:
            raise StoreError(
                f"collection {target!r} exists at {staging.location}; pass --replace to "
                "replace it, or restore with --to-collection NEW"
            )
        with tempfile.TemporaryDirectory(prefix=".restore-", dir=data_dir) as tmp:
            if m.kind == "server":
                _unpack(snapshot, Path(tmp), {}, on_progress)
                upload = Path(tmp) / SERVER_MEMBER
                checksum = m.files[SERVER_MEMBER]["sha256"]
                how = "recovered by the server"
            else:
                try:
                    with _unpacked_edge(snapshot, Path(tmp) / "edge", target, on_progress) as edge:
                        if staging.meta is not None:  # left by a restore that was stopped
                            staging.drop()
                        _copy_back(edge, staging, snapshot, on_progress)
                    upload = Path(tmp) / "staging.snapshot"
                    checksum = staging.download_snapshot(upload, on_progress=on_progress)
                except BaseException:
                    _drop_quietly(staging)
                    raise
                how = "copied into a staging collection, then recovered by the server"
            try:
                staging.upload_snapshot(upload, collection=target, checksum=checksum)
            finally:
                if m.kind == "edge":
                    _drop_quietly(staging)
        location = staging.location
    with open_collection(target) as restored:
        _verify(restored, snapshot)
    return how, location, exists


def _copy_back(
    source: KnnStore, target: KnnStore, snapshot: Snapshot, on_progress: Progress
) -> None:
    """Copy the collection unpacked from ``snapshot`` into ``target``, with the snapshot's
    own record (not that of a copy), and check it."""
    from knn_store.store.transfer import copy_collection

    copy_collection(source, target, on_progress=on_progress)
    target.replace_meta(CollectionMeta.from_dict(snapshot.manifest.record))
    _verify(target, snapshot)


def _unpacked_edge(snapshot: Snapshot, root: Path, target: str, on_progress: Progress) -> KnnStore:
    """Unpack ``snapshot`` into an embedded collection ``root/target``, check it against its
    manifest and return it open. A ``server`` snapshot goes through Qdrant Edge's own
    unpacking of a server shard snapshot."""
    from knn_store.store.edge import EdgeStore

    m = snapshot.manifest
    _mkdir(root)
    if m.kind == "edge":
        _unpack(snapshot, root, {EDGE_PREFIX: f"{target}/"}, on_progress)
    else:
        _server_to_edge(snapshot, root, target, on_progress)
    folder = root / target
    if not (folder / "meta.json").is_file():
        raise StoreDamaged(f"{snapshot.path} holds no collection record (meta.json)")
    store = EdgeStore(folder, create=False)
    try:
        if m.kind == "server":  # the record and policy as the store itself writes them
            store.replace_meta(CollectionMeta.from_dict(m.record))
            if m.policy is not None:
                store.save_policy(m.policy)
        _verify(store, snapshot)
        if m.kind == "server":
            store.save_state()
    except BaseException:
        store.close()
        raise
    return store


def _server_to_edge(snapshot: Snapshot, root: Path, target: str, on_progress: Progress) -> None:
    """Turn a ``server`` snapshot into an embedded collection folder ``root/target``: the
    server snapshot's one shard is a shard snapshot, which Qdrant Edge unpacks."""
    import qdrant_edge as qe

    from knn_store.store.edge import META_FILE, SHARD_DIR

    m = snapshot.manifest

    def refuse(why: str) -> StoreError:
        return StoreError(
            f"cannot restore {snapshot.name} (a Qdrant server snapshot) onto Qdrant Edge: "
            f"{why}; restore it onto a server instead (--backend qdrant --url ...)"
        )

    _unpack(snapshot, root, {}, on_progress)
    server_file, shard_file = root / SERVER_MEMBER, root / "shard.snapshot"
    try:
        with tarfile.open(server_file, "r:") as tar:
            config_member = tar.extractfile("config.json")
            assert config_member is not None
            config = json.loads(config_member.read())
            shards = int(config["params"].get("shard_number") or 1)
            if shards != 1:
                raise refuse(f"the collection has {shards} shards, and Qdrant Edge holds one")
            # the members under 0/ are shard 0's snapshot, the format Qdrant Edge unpacks
            with tarfile.open(shard_file, "w", format=tarfile.PAX_FORMAT) as out:
                for member in tar:
                    if not member.name.startswith("0/"):
                        continue
                    if not member.isfile():
                        continue  # folders come with their files
                    info = _tarinfo(member.name[2:], member.size)  # plain, even if sparse
                    out.addfile(info, tar.extractfile(member))
    except (OSError, tarfile.TarError, KeyError, ValueError, TypeError) as exc:
        raise refuse(f"its Qdrant snapshot cannot be read ({_first_line(exc)})") from exc
    server_file.unlink()
    folder = root / target
    _mkdir(folder)
    try:
        qe.EdgeShard.unpack_snapshot(str(shard_file), str(folder / SHARD_DIR))
    except Exception as exc:  # qdrant_edge raises plain exceptions
        raise refuse(f"Qdrant Edge cannot unpack its shard ({_first_line(exc)})") from exc
    finally:
        shard_file.unlink(missing_ok=True)
    # sealed, as the store writes it (the manifest's record was checked when it was read)
    record = seal(CollectionMeta.from_dict(m.record).to_dict())
    (folder / META_FILE).write_text(json.dumps(record, indent=2))


def _verify(store: KnnStore, snapshot: Snapshot) -> None:
    """Raise ``StoreDamaged`` unless ``store`` holds what ``snapshot``'s manifest says."""
    m = snapshot.manifest
    problems = []
    expected = CollectionMeta.from_dict(m.record).to_dict()
    if store.meta is None or store.meta.to_dict() != expected:
        problems.append("its record differs")
    if store.load_policy() != m.policy:
        problems.append("its tuned policy differs")
    points = store.count()
    if points != m.points:
        problems.append(f"it holds {points:,} points, not {m.points:,}")
    elif store.domains() != m.domains:
        problems.append("its points per domain differ")
    if problems:
        raise StoreDamaged(
            f"what {snapshot.name} restored at {store.location} does not match its manifest "
            f"({'; '.join(problems)}); the snapshot is damaged, or was taken while points "
            "were being written"
        )


_SOURCES = {"edge": "an embedded", "local": "a local-mode", "qdrant": "a server"}


def _how(snapshot: Snapshot, verb: str) -> str:
    source = _SOURCES.get(snapshot.manifest.source.get("backend"), "a")
    return f"{verb} from {source} collection's snapshot"


@contextlib.contextmanager
def _collection_lock(path: Path) -> Iterator[None]:
    """Hold the lock file that ``EdgeStore`` holds while it has the collection at ``path``
    open (``.<name>.lock`` beside its folder): ``StoreLocked`` if another holder has it."""
    import fcntl

    lock = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {lock}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreLocked(
                f"collection {path.name!r} in {path.parent} is in use (another knnlm "
                "command?); stop it before replacing the collection"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _drop_quietly(store: KnnStore) -> None:
    with contextlib.suppress(KnnlmError):
        store.drop()


# --- the tar file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    source: Path
    name: str
    size: int
    sha256: str
    extents: list[tuple[int, int]]  # (offset, length) of the parts that are not zeros

    @property
    def stored(self) -> int:
        return sum(n for _, n in self.extents)


def _scan(source: Path, name: str) -> _Member:
    """Size, sha256 and data extents of ``source`` (runs of zeros are left out)."""
    digest = hashlib.sha256()
    extents: list[tuple[int, int]] = []
    pos = 0
    with source.open("rb") as f:
        while chunk := f.read(_BLOCK):
            digest.update(chunk)
            if chunk != _ZEROS[: len(chunk)]:
                if extents and extents[-1][0] + extents[-1][1] == pos:
                    extents[-1] = (extents[-1][0], extents[-1][1] + len(chunk))
                else:
                    extents.append((pos, len(chunk)))
            pos += len(chunk)
    return _Member(source, name, pos, digest.hexdigest(), extents)


def _write_snapshot(
    dest: Path, manifest: SnapshotManifest, files: list[tuple[Path, str]], on_progress: Progress
) -> None:
    """Write the manifest, then ``files`` (source path, member name), into ``dest``: through
    a ``.partial`` file, so that a snapshot cut short never looks like one."""
    try:
        members = [_scan(source, name) for source, name in files]
    except OSError as exc:
        raise StoreError(f"cannot read the collection's files: {exc}") from exc
    files = {m.name: {"size": m.size, "sha256": m.sha256} for m in members}
    manifest = replace(manifest, files=files)
    stored = sum(m.stored for m in members)
    _require_space(dest.parent, stored, "write the snapshot")
    partial = dest.with_name(dest.name + ".partial")
    advance = Counter(on_progress, "write", stored).add
    try:
        with partial.open("wb") as raw:
            with tarfile.open(
                fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20
            ) as tar:
                data = json.dumps(manifest.to_dict(), indent=1).encode()
                info = _tarinfo(MANIFEST, len(data))
                tar.addfile(info, _ChunkReader(iter([data])))
                for i, member in enumerate(members):
                    info, chunks = _member_entry(member, i, advance)
                    tar.addfile(info, _ChunkReader(chunks))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, dest)
    except OSError as exc:
        raise StoreError(f"cannot write the snapshot {dest}: {exc.strerror or exc}") from exc
    finally:
        partial.unlink(missing_ok=True)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def _member_entry(
    member: _Member, index: int, advance: Callable[[int], None]
) -> tuple[tarfile.TarInfo, Iterator[bytes]]:
    """The header and data of a member: plain if the file has no runs of zeros, else in GNU
    tar's sparse format 1.0 (a map of the data extents, then the extents)."""
    plain = member.extents == [(0, member.size)] or member.size == 0
    if plain or member.stored >= _MAX_SPARSE:  # (pax sizes past 8 GiB read back wrongly)
        return _tarinfo(member.name, member.size), _read_extents(member, b"", advance)
    extents = list(member.extents)
    if not extents or sum(extents[-1]) < member.size:
        extents.append((member.size, 0))  # GNU tar's mark of a file that ends in a hole
    lines = [str(len(extents))] + [f"{o}\n{n}" for o, n in extents]
    sparse_map = ("\n".join(lines) + "\n").encode()
    sparse_map += bytes(-len(sparse_map) % tarfile.BLOCKSIZE)
    info = _tarinfo(f"GNUSparseFile.0/{index}", len(sparse_map) + member.stored)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": member.name,
        "GNU.sparse.realsize": str(member.size),
    }
    return info, _read_extents(member, sparse_map, advance)


def _read_extents(member: _Member, head: bytes, advance: Callable[[int], None]) -> Iterator[bytes]:
    if head:
        yield head
    with member.source.open("rb") as f:
        for offset, length in member.extents:
            f.seek(offset)
            while length:
                chunk = f.read(min(length, 1 << 20))
                if not chunk:
                    raise StoreError(f"{member.source} shrank while it was being archived")
                length -= len(chunk)
                advance(len(chunk))
                yield chunk


class _ChunkReader:
    """A ``read()``-only file over an iterator of byte chunks (what ``addfile`` copies)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = b""
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0:
            if self._pos >= len(self._chunk):
                self._chunk, self._pos = next(self._chunks, b""), 0
                if not self._chunk:
                    break
            end = len(self._chunk) if n < 0 else min(len(self._chunk), self._pos + n)
            parts.append(self._chunk[self._pos : end])
            if n > 0:
                n -= end - self._pos
            self._pos = end
        return b"".join(parts)


def _unpack(snapshot: Snapshot, dest: Path, rename: dict[str, str], on_progress: Progress) -> None:
    """Extract every member of ``snapshot`` under ``dest`` (``rename`` maps member-name
    prefixes to others), sparse, checking each against the manifest's size and sha256."""
    m = snapshot.manifest
    where = str(snapshot.path)
    expected = dict(m.files)
    logical = sum(f["size"] for f in m.files.values())
    _require_space(dest, snapshot.size, "restore the snapshot")
    advance = Counter(on_progress, "unpack", logical).add
    try:
        with tarfile.open(snapshot.path, "r:") as tar:
            members = iter(tar)
            first = next(members, None)
            assert first is not None and first.name == MANIFEST  # read_snapshot checked it
            for member in members:
                want = expected.pop(member.name, None)
                if want is None or not member.isfile():
                    raise StoreDamaged(
                        f"{where} holds {member.name!r}, which its manifest does not list; "
                        "the snapshot is damaged"
                    )
                name = member.name
                for old, new in rename.items():
                    if name.startswith(old):
                        name = new + name[len(old) :]
                out = dest / name
                out.parent.mkdir(parents=True, exist_ok=True)
                reader = tar.extractfile(member)
                assert reader is not None
                size, sha256 = _extract(reader, out, advance)
                if size != want["size"] or sha256 != want["sha256"]:
                    raise StoreDamaged(
                        f"{where}: {member.name} does not match its checksum; the snapshot "
                        "is damaged"
                    )
    except (tarfile.TarError, EOFError) as exc:
        raise StoreDamaged(
            f"{where} cannot be read ({_first_line(exc)}); the snapshot is truncated or damaged"
        ) from exc
    except OSError as exc:
        raise StoreError(f"cannot unpack {where} into {dest}: {exc.strerror or exc}") from exc
    if expected:
        raise StoreDamaged(
            f"{where} lacks {len(expected)} of the files its manifest lists (such as "
            f"{next(iter(expected))}); the snapshot is truncated or damaged"
        )


def _extract(reader: Any, out_path: Path, advance: Callable[[int], None]) -> tuple[int, str]:
    """Copy ``reader`` into ``out_path``, leaving holes where it reads zeros; its size and
    sha256."""
    digest = hashlib.sha256()
    size = 0
    with out_path.open("wb") as out:
        while chunk := reader.read(_BLOCK):
            digest.update(chunk)
            if chunk == _ZEROS[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            size += len(chunk)
            advance(len(chunk))
        out.truncate(size)
    return size, digest.hexdigest()


def _check_member_name(name: str, kind: str, where: str) -> None:
    path = PurePosixPath(name)
    safe = not path.is_absolute() and all(part not in ("", ".", "..") for part in path.parts)
    if kind == "edge":
        safe = safe and name.startswith(EDGE_PREFIX) and len(path.parts) > 1
    else:
        safe = safe and name == SERVER_MEMBER
    if not safe or name == MANIFEST:
        raise StoreDamaged(f"{where} lists a file {name!r} that a snapshot cannot hold")


def _require_space(folder: Path, needed: int, what: str) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # nothing to measure with; the write itself will tell
    if free < needed + _SPARE_BYTES:
        raise StoreUnavailable(
            f"only {free / 2**20:.1f} MB free on the disk of {folder}, too little to {what} "
            f"({(needed + _SPARE_BYTES) / 2**20:.1f} MB wanted); free some space"
        )


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {folder}: {exc.strerror or exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
