"""Small file helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path


def write(path: Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path``, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def truncate_vector_files(collection: Path) -> list[Path]:
    """Cut every key file of an Edge collection to 0 bytes, as a crash or a full disk can."""
    files = sorted(collection.glob("shard/segments/*/vector_storage/**/chunk_*.mmap"))
    assert files, f"no vector files under {collection}"
    for file in files:
        file.write_bytes(b"")
    return files


def corrupt_wal(collection: Path) -> list[Path]:
    """Overwrite the segment headers of an Edge collection's write-ahead log with garbage."""
    files = sorted((collection / "shard" / "wal").glob("open-*"))
    assert files, f"no write-ahead log under {collection}"
    for file in files:
        with file.open("r+b") as handle:
            handle.write(b"\xde\xad\xbe\xef" * 16)
    return files


def collection_files(collection: Path) -> dict[str, bytes | None]:
    """The bytes of a collection's record and tuned policy (None where absent), to tell
    whether a command changed them."""
    return {
        name: (collection / name).read_bytes() if (collection / name).is_file() else None
        for name in ("meta.json", "policy.json")
    }
