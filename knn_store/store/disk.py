"""The local disk under an embedded collection or a snapshot: free space checked before a
write that must not find the disk full, and folders made with one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

from knn_store.errors import StoreUnavailable

SPARE_BYTES = 32 * 2**20  # free space a write leaves on the disk, beyond what it needs


def require_free_space(
    folder: Path,
    needed: int,
    what: str,
    *,
    spare: int = SPARE_BYTES,
    why: str = "",
    then: str = "",
) -> None:
    """Refuse to ``what`` unless ``needed`` bytes and ``spare`` more are free on the disk
    of ``folder`` (or of its nearest existing parent). ``why`` says what a full disk would
    do, ``then`` what to do after freeing space."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # nothing to measure with; the write itself will tell
    wanted = needed + spare
    if free < wanted:
        because = f": {why}" if why else ""
        after = f", then {then}" if then else ""
        raise StoreUnavailable(
            f"only {_megabytes(free)} free on the disk of {folder}, too little to {what} "
            f"({_megabytes(wanted)} wanted{because}); free some space{after}"
        )


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {folder}: {exc.strerror or exc}") from exc


def _megabytes(n: float) -> str:
    return f"{n / 2**20:.1f} MB"
