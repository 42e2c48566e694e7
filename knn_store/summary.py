"""What a collection holds and whether it is sound, for ``knnlm info``, ``knnlm check``
and the service's ``/v1/collection``: the store layer's checks, with the tuned policy read
by the code that knows what a policy means."""

from __future__ import annotations

from typing import Any

from knn_store.errors import StoreDamaged
from knn_store.progress import Progress, no_progress
from knn_store.saved_policy import verify_policy
from knn_store.store.base import KnnStore
from knn_store.store.check import CheckReport, check_collection


def check(
    store: KnnStore, *, full: bool = True, on_progress: Progress = no_progress
) -> CheckReport:
    """``check_collection`` with the tuned policy verified too."""
    return check_collection(store, full=full, on_progress=on_progress, verify_policy=verify_policy)


def seal_records(store: KnnStore, unsealed: list[str]) -> list[str]:
    """After a sound ``check`` of ``store`` read with ``accepting_unsealed`` (which listed
    the records it read without a checksum in ``unsealed``): write its record, tuned policy
    and record of the last write back sealed, the latter with its files' content checksums.
    The names of what was sealed."""
    sealed = set(unsealed)
    if store.meta is not None and unsealed:
        store.replace_meta(store.meta)  # written back with its checksum
        policy = store.load_policy()
        if policy is not None:
            store.save_policy(policy)
    if unsealed or (store.load_state() is None and store.content_checksums() is None):
        store.flush()
        store.save_state()
        if store.content_checksums() is not None:
            sealed.add("content checksums of the storage files")
    return sorted(sealed)


def collection_summary(store: KnnStore, *, backend: str) -> dict[str, Any]:
    """What `knnlm info --json` prints (and the service's /v1/collection answers), after the
    quick health check: a damaged collection raises ``StoreDamaged`` rather than half a
    summary."""
    health = check(store, full=False)
    if not health.ok:
        problems = "; ".join(f"{f.what}: {f.detail}" for f in health.problems)
        raise StoreDamaged(f"collection {store.name!r} is damaged ({problems}); run `knnlm check`")
    meta = store.meta
    assert meta is not None
    return {
        "collection": store.name,
        "backend": backend,
        "location": store.location,
        "points": store.count(),
        "domains": store.domains(),
        "model": meta.model,
        "key_type": meta.key_type,
        "dim": meta.dim,
        "vocab_size": meta.vocab_size,
        "tokenizer": meta.tokenizer,
        "storage": meta.storage.to_dict(),
        "server_version": store.server_version,
        "engine_storage": store.engine_storage(),
        "policy": _policy_summary(store.load_policy()),
    }


def _policy_summary(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {
        "kind": (raw.get("policy") or {}).get("kind"),
        "temperature": raw.get("temperature"),
        "k": raw.get("k"),
        "gate_threshold": (raw.get("gate") or {}).get("threshold"),
        "domains": raw.get("domains") or [],
        "saved": raw.get("saved"),
    }
