"""Backups: ``knnlm snapshot create|list|restore``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from knnlm.options import STORE_OPTIONS, options, output_options, settings_from
from knnlm.progress import Bars

if TYPE_CHECKING:
    from knn_store.settings import KnnlmSettings
    from knn_store.store.base import KnnStore
    from knn_store.store.snapshot import Snapshot


@click.group()
def snapshot() -> None:
    """Back up a collection into one file, list the backups, restore one.

    A snapshot holds the points, the record of what built the collection and its tuned
    policy; a restore gives back the same collection, so `knnlm eval` gives the same
    numbers. Snapshots are kept in <data-dir>/.snapshots/<collection>/ unless --output
    names another place.

    \b
    Examples:
      knnlm snapshot create --collection docs
      knnlm snapshot list --collection docs
      knnlm snapshot restore docs-2026-01-31T12-00-00Z --collection docs --replace
      knnlm snapshot restore backups/docs.knnlm-snapshot.tar --to-collection docs-old
      knnlm snapshot restore docs-2026-01-31T12-00-00Z --collection docs \\
          --backend qdrant --url http://localhost:6333          # an embedded one onto a server
    """


@snapshot.command("create")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="Write the snapshot to this file, or into this folder "
    "(default: <data-dir>/.snapshots/<collection>/).",
)
@options(*STORE_OPTIONS)
@output_options
def create(output: Path | None, as_json: bool, quiet: bool, **params: Any) -> None:
    """Write a snapshot of a collection: its points, record and tuned policy.

    An embedded collection is flushed and its folder archived; a server makes the snapshot
    itself, and knnlm downloads it (and then deletes it on the server). A damaged
    collection is refused (see `knnlm check`). Run it while nothing writes to the
    collection.

    \b
    Examples:
      knnlm snapshot create --collection docs
      knnlm snapshot create --collection docs -o /backups/
      knnlm snapshot create --backend qdrant --url http://localhost:6333 --collection docs
    """
    from knn_store import open_store
    from knn_store.store.snapshot import create_snapshot, snapshot_folder

    settings = settings_from(params)
    with open_store(settings) as store, Bars(quiet=quiet) as bars:
        made = create_snapshot(
            store,
            folder=snapshot_folder(settings.data_dir, store.name),
            output=output,
            on_progress=bars,
        )
    if as_json:
        click.echo(json.dumps(_summary(made)))
        return
    m = made.manifest
    click.echo(
        f"snapshot of {m.collection!r}: {m.points:,} points in {len(m.domains)} domains, "
        f"policy {'saved' if m.policy else 'none'}, {_size(made.size)} -> {made.path}"
    )


@snapshot.command("list")
@options(*STORE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_(as_json: bool, **params: Any) -> None:
    """List the snapshots of --collection (of every collection when none is given), oldest
    first, with their points, size and date.

    \b
    Examples:
      knnlm snapshot list --collection docs
      knnlm snapshot list --json
    """
    from knn_store.store.snapshot import list_snapshots

    settings = settings_from(params)
    found, unreadable = list_snapshots(_folders(settings))
    if as_json:
        click.echo(json.dumps([_summary(s) for s in found]))
    elif not found:
        click.echo(f"no snapshots in {_root(settings)}", err=True)
    else:
        for s in found:
            m = s.manifest
            click.echo(
                f"{s.name}  {m.points:>12,} points  {_size(s.size):>9}  {m.created}  "
                f"from {m.source.get('backend', m.kind)}"
            )
    for path, problem in unreadable:
        click.echo(f"knnlm: warning: {path.name} is not a readable snapshot: {problem}", err=True)


@snapshot.command("restore")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.option(
    "--to-collection",
    help="Restore as this collection (default: --collection if given, else the name the "
    "snapshot was taken from).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace a collection of that name. On Edge the old one is removed only once the "
    "snapshot is in place; a server replaces it in its own recovery.",
)
@options(*STORE_OPTIONS)
@output_options
def restore(
    snapshot_ref: str,
    to_collection: str | None,
    replace: bool,
    as_json: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Restore a collection from SNAPSHOT: a file, or a name that `knnlm snapshot list`
    shows.

    Every file is checked against the snapshot's checksums, and the restored points per
    domain, record and policy against what the snapshot recorded, before the collection
    takes its name: nothing half-restored looks like a collection. A snapshot taken on
    Edge restores onto a server (its points are copied there) and the other way round
    (through Qdrant Edge's own unpacking of a server's shard; a collection of several
    shards cannot be).

    \b
    Examples:
      knnlm snapshot restore docs-2026-01-31T12-00-00Z --collection docs --replace
      knnlm snapshot restore /backups/docs-2026-01-31T12-00-00Z.knnlm-snapshot.tar
      knnlm snapshot restore FILE --to-collection docs-copy --backend qdrant \\
          --url http://localhost:6333
    """
    from knn_store import open_store
    from knn_store.store.snapshot import find_snapshot, restore_snapshot

    settings = settings_from(params)
    found = find_snapshot(snapshot_ref, _folders(settings))
    explicit = "collection" in settings.model_fields_set
    target = to_collection or (settings.collection if explicit else found.manifest.collection)
    # a plain collection name, whoever chose it (named by the flag that gave it)
    named = {"collection": "--to-collection"} if to_collection else None
    settings_from(params, flags=named, collection=target)

    def open_collection(name: str) -> KnnStore:
        return open_store(settings, create=True, collection=name)

    with Bars(quiet=quiet) as bars:
        report = restore_snapshot(
            found,
            target,
            backend=settings.backend,
            data_dir=settings.data_dir,
            open_collection=open_collection,
            replace=replace,
            on_progress=bars,
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "collection": report.collection,
                    "location": report.location,
                    "points": report.points,
                    "domains": report.domains,
                    "policy": report.policy,
                    "replaced": report.replaced,
                    "snapshot": str(found.path),
                    "seconds": round(report.seconds, 2),
                }
            )
        )
        return
    replaced = ", replacing the old one" if report.replaced else ""
    click.echo(
        f"restored {report.collection!r} at {report.location}{replaced}: {report.points:,} "
        f"points in {len(report.domains)} domains, policy "
        f"{'restored' if report.policy else 'none'}; {report.how} ({found.name}), "
        f"{report.seconds:.1f}s"
    )


def _root(settings: KnnlmSettings) -> Path:
    from knn_store.store.snapshot import SNAPSHOTS_DIR

    return settings.data_dir / SNAPSHOTS_DIR


def _folders(settings: KnnlmSettings) -> list[Path]:
    """Where snapshots are looked for: --collection's folder when given, else every one."""
    from knn_store.store.snapshot import snapshot_folder

    if "collection" in settings.model_fields_set:
        return [snapshot_folder(settings.data_dir, settings.collection)]
    root = _root(settings)
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _summary(s: Snapshot) -> dict[str, Any]:
    m = s.manifest
    return {
        "name": s.name,
        "path": str(s.path),
        "size": s.size,
        "collection": m.collection,
        "points": m.points,
        "domains": m.domains,
        "policy": m.policy is not None,
        "created": m.created,
        "kind": m.kind,
        "source": m.source.get("backend"),
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
