"""Restoring a snapshot (``knnlm snapshot restore``): every member's checksum checked, then
what was restored opened where nothing else can see it yet and compared with the manifest;
only then does the collection appear under its name.

An embedded collection is unpacked into a hidden folder next to its place and renamed into it
(a replaced one is moved aside first, and removed once the new one is in place). A server
recovers a ``server`` snapshot itself (Qdrant's upload recovery); an ``edge`` snapshot is
copied point by point into a staging collection there, which the server then snapshots and
recovers under the target's name. A ``server`` snapshot restored onto Qdrant Edge goes
through Qdrant Edge's own shard-snapshot unpacking."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from knn_store.errors import (
    ConfigError,
    KnnlmError,
    StoreDamaged,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    first_line,
)
from knn_store.progress import Progress, no_progress
from knn_store.store.base import CollectionMeta, KnnStore
from knn_store.store.disk import make_folder
from knn_store.store.records import seal
from knn_store.store.snapshot_files import (
    EDGE_PREFIX,
    SERVER_MEMBER,
    Snapshot,
    tarinfo,
    unpack,
)


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
    make_folder(data_dir)
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
        make_folder(staging)
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
    make_folder(data_dir)
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
    make_folder(data_dir)
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
                unpack(snapshot, Path(tmp), {}, on_progress)
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
    make_folder(root)
    if m.kind == "edge":
        unpack(snapshot, root, {EDGE_PREFIX: f"{target}/"}, on_progress)
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

    unpack(snapshot, root, {}, on_progress)
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
                    info = tarinfo(member.name[2:], member.size)  # plain, even if sparse
                    out.addfile(info, tar.extractfile(member))
    except (OSError, tarfile.TarError, KeyError, ValueError, TypeError) as exc:
        raise refuse(f"its Qdrant snapshot cannot be read ({first_line(exc)})") from exc
    server_file.unlink()
    folder = root / target
    make_folder(folder)
    try:
        qe.EdgeShard.unpack_snapshot(str(shard_file), str(folder / SHARD_DIR))
    except Exception as exc:  # qdrant_edge raises plain exceptions
        raise refuse(f"Qdrant Edge cannot unpack its shard ({first_line(exc)})") from exc
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
