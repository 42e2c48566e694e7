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

This module takes snapshots; ``snapshot_files`` holds the file format (manifest, sparse tar)
and the listing, ``restore`` the way back. All three are importable from here.
"""

from __future__ import annotations

import datetime as dt
import tarfile
import tempfile
from pathlib import Path

from knn_store.errors import (
    CollectionMissing,
    ConfigError,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    first_line,
)
from knn_store.progress import Progress, no_progress
from knn_store.store.base import KnnStore
from knn_store.store.restore import RestoreReport, restore_snapshot
from knn_store.store.snapshot_files import (
    EDGE_PREFIX,
    MANIFEST,
    SERVER_MEMBER,
    SNAPSHOTS_DIR,
    SUFFIX,
    Snapshot,
    SnapshotManifest,
    find_snapshot,
    list_snapshots,
    read_snapshot,
    write_snapshot,
)

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
    if store.meta is None:
        raise CollectionMissing(f"collection {store.name!r} is empty: nothing to snapshot")
    _require_sound(store)
    dest = _destination(store.name, folder, output)
    base = {
        "collection": store.name,
        "points": store.count(),
        "domains": store.domains(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "record": store.meta.to_dict(),
        "policy": store.load_policy(),
        "source": {
            "backend": store.backend,
            "location": store.location,
            "server_version": store.server_version,
        },
    }
    if store.folder is not None:  # an embedded collection: its own files
        store.flush()
        manifest = SnapshotManifest(kind="edge", **base)
        write_snapshot(dest, manifest, _edge_members(store.folder), on_progress)
    elif store.backend == "local":
        from knn_store.store.edge import EdgeStore
        from knn_store.store.transfer import copy_collection

        # qdrant-client's local mode has no snapshots: copy it into an embedded collection
        with (
            tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent) as tmp,
            EdgeStore(Path(tmp) / store.name) as edge,
        ):
            copy_collection(store, edge, on_progress=on_progress)
            edge.replace_meta(store.meta)  # the record itself, not one of a copy
            manifest = SnapshotManifest(kind="edge", **base)
            write_snapshot(dest, manifest, _edge_members(edge.path), on_progress)
    else:  # a server's own snapshot
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
            write_snapshot(dest, manifest, [(downloaded, SERVER_MEMBER)], on_progress)
    return read_snapshot(dest)


def _require_every_shard(path: Path, collection: str) -> None:
    """A server node snapshots the shards it holds, and only names the others: refuse a
    snapshot that lacks the data of some shard."""
    try:
        with tarfile.open(path, "r:") as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError) as exc:
        raise StoreError(
            f"the server's snapshot of {collection!r} cannot be read: {first_line(exc)}"
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


__all__ = [
    "MANIFEST",
    "SERVER_MEMBER",
    "SNAPSHOTS_DIR",
    "SUFFIX",
    "RestoreReport",
    "Snapshot",
    "SnapshotManifest",
    "create_snapshot",
    "find_snapshot",
    "list_snapshots",
    "read_snapshot",
    "restore_snapshot",
    "snapshot_folder",
]
