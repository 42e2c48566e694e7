"""The snapshot file: its manifest, and the sparse tar that holds the collection's files
(GNU tar's sparse format 1.0, which GNU tar and Python's tarfile read), written and unpacked
with every member's size and sha256 checked; and finding snapshots on disk. No store is
opened here: ``snapshot`` (create) and ``restore`` use it."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from knn_store.errors import (
    ConfigError,
    KnnlmError,
    StoreDamaged,
    StoreError,
    first_line,
)
from knn_store.progress import Counter, Progress
from knn_store.store.disk import require_free_space

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
        raise StoreDamaged(f"{where} is not a readable knnlm snapshot: {first_line(exc)}") from exc
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


def write_snapshot(
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
    require_free_space(dest.parent, stored, "write the snapshot")
    partial = dest.with_name(dest.name + ".partial")
    advance = Counter(on_progress, "write", stored).add
    try:
        with partial.open("wb") as raw:
            with tarfile.open(
                fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20
            ) as tar:
                data = json.dumps(manifest.to_dict(), indent=1).encode()
                info = tarinfo(MANIFEST, len(data))
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


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
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
        return tarinfo(member.name, member.size), _read_extents(member, b"", advance)
    extents = list(member.extents)
    if not extents or sum(extents[-1]) < member.size:
        extents.append((member.size, 0))  # GNU tar's mark of a file that ends in a hole
    lines = [str(len(extents))] + [f"{o}\n{n}" for o, n in extents]
    sparse_map = ("\n".join(lines) + "\n").encode()
    sparse_map += bytes(-len(sparse_map) % tarfile.BLOCKSIZE)
    info = tarinfo(f"GNUSparseFile.0/{index}", len(sparse_map) + member.stored)
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


def unpack(snapshot: Snapshot, dest: Path, rename: dict[str, str], on_progress: Progress) -> None:
    """Extract every member of ``snapshot`` under ``dest`` (``rename`` maps member-name
    prefixes to others), sparse, checking each against the manifest's size and sha256."""
    m = snapshot.manifest
    where = str(snapshot.path)
    expected = dict(m.files)
    logical = sum(f["size"] for f in m.files.values())
    require_free_space(dest, snapshot.size, "restore the snapshot")
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
            f"{where} cannot be read ({first_line(exc)}); the snapshot is truncated or damaged"
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
