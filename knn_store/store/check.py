"""Verifying a collection: ``knnlm check`` (everything) and ``knnlm info`` (the quick part).

Each finding is a line that says what was checked and what was found; any failed finding
means the collection is damaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knn_store.errors import KnnlmError, StoreError
from knn_store.progress import Counter, Progress, no_progress
from knn_store.store.base import INDEXED_FIELDS, KnnStore

SAMPLE_POINTS = 256  # keys read back by the quick check (`knnlm info`)
KEPT_FINDINGS = ("storage files", "keys (exact scan)", "keys (every point)")


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def add(self, what: str, ok: bool, detail: str) -> None:
        self.findings.append(Finding(what, ok, detail))


# Reads a stored policy for its collection: a one-line description, or a KnnlmError. The
# policy's meaning (lambdas, gate) lives above the store layer, which passes it down here.
PolicyVerifier = Callable[[dict[str, Any], KnnStore], str]


def check_collection(
    store: KnnStore,
    *,
    full: bool = True,
    on_progress: Progress = no_progress,
    verify_policy: PolicyVerifier | None = None,
) -> CheckReport:
    """Check ``store``: its record, counts, payload indexes, policy and, with ``full``,
    every key (read back by an exact scan and by scrolling through every point); without
    ``full``, one search and the first page of keys, so that ``info`` still notices an
    unreadable vector file without a scan of the whole collection.

    ``on_progress`` hears the bytes hashed (stage "hash") and the points scrolled
    (stage "check").
    ``verify_policy`` reads the tuned policy (``knn_store.saved_policy.verify_policy``);
    without it the policy is only checked to be a JSON object.
    """
    report = CheckReport()
    meta = store.meta
    if meta is None:
        report.add("record", False, "the collection has no record of what built it")
        return report
    report.add(
        "record",
        True,
        f"{meta.model}, key {meta.key_type}, {meta.dim}-d, {meta.vocab_size:,}-token vocabulary",
    )
    if meta.copying:
        report.add(
            "copy",
            False,
            f"an unfinished copy of {meta.copy_of}: run the same `knnlm rebuild` or "
            "`knnlm push` again to finish it",
        )
    _guard(report, "storage settings", lambda: _storage(store))
    _guard(report, "storage files", lambda: _files(store, deep=full, on_progress=on_progress))
    _guard(report, "payload indexes", lambda: _indexes(store))
    _guard(report, "point counts", lambda: _counts(store))
    _guard(report, "policy", lambda: _policy(store, verify_policy))
    if full:
        _guard(report, "keys (exact scan)", lambda: _probe(store))
        _guard(report, "keys (every point)", lambda: _scroll_all(store, on_progress))
        # What a full check finds wrong with the keys and their files is kept with the
        # store: every reader refuses it until a check finds them sound (damage that kept
        # its files' times, a failing disk's, is seen only by hashing every file, as here).
        # The rest (an unfinished copy, a record) readers see for themselves.
        store.flag_damage(
            [f"{f.what}: {f.detail}" for f in report.problems if f.what in KEPT_FINDINGS]
        )
    else:
        _guard(report, "keys (sample)", lambda: _sample(store))
        flagged = store.flagged()
        if flagged:
            report.add("last full check", False, "; ".join(flagged))
    return report


def _guard(report: CheckReport, what: str, run: Callable[[], tuple[bool, str]]) -> None:
    try:
        ok, detail = run()
    except KnnlmError as exc:
        ok, detail = False, str(exc)
    report.add(what, ok, detail)


def _storage(store: KnnStore) -> tuple[bool, str]:
    """The engine's own settings against the record (a server can be changed behind
    knnlm's back, or refuse part of a configuration)."""
    assert store.meta is not None
    engine = store.engine_storage()
    if engine is None:
        return True, store.meta.storage.describe()
    differences = store.meta.storage.differences(engine)
    if differences:
        return False, "; ".join(differences)
    return True, f"{store.meta.storage.describe()} (as the server reports)"


def _files(store: KnnStore, *, deep: bool, on_progress: Progress) -> tuple[bool, str]:
    problems = store.file_problems(deep=deep, on_progress=on_progress)
    if problems:
        return False, "; ".join(problems)
    detail = "key and id files as long as their points need"
    checksums = store.content_checksums()
    if checksums is not None:
        files, size = checksums
        how = "hashed" if deep else "sizes and times"
        detail += f"; {files:,} files ({size / 2**20:,.1f} MB) as last written ({how})"
    return True, detail


def _indexes(store: KnnStore) -> tuple[bool, str]:
    missing = sorted(set(INDEXED_FIELDS) - store.indexed_fields())
    if missing:
        return False, f"missing keyword index on {', '.join(missing)}: the segments were lost?"
    return True, ", ".join(INDEXED_FIELDS)


def _counts(store: KnnStore) -> tuple[bool, str]:
    exact, engine = store.count(), store.engine_points()
    numbers = f"{exact:,} points; engine {engine:,}"
    agree = exact == engine or not store.engine_count_is_exact
    problems = [] if agree else ["the exact and the engine's counts disagree"]
    if not store.engine_count_is_exact:
        numbers += " (approximate)"
    # Points lost since the last write are told even when the per-field counts fail (a
    # lost segment takes its payload indexes with it).
    recorded = store.load_state()
    if recorded is not None and isinstance(recorded.get("points"), int):
        if exact < recorded["points"]:
            problems.append(f"{recorded['points'] - exact:,} lost since the last write")
        else:
            numbers += f"; {recorded['points']:,} at the last completed write"
    try:
        by_domain = sum(store.domains().values())
        by_doc = sum(store.doc_counts().values())
    except StoreError as exc:
        problems.append(f"cannot count per domain and document: {exc}")
    else:
        numbers += f"; by domain {by_domain:,}; by document {by_doc:,}"
        if not exact == by_domain == by_doc:
            problems.append("the counts per domain and per document disagree")
    return not problems, "; ".join([numbers, *problems])


def _policy(store: KnnStore, verify: PolicyVerifier | None) -> tuple[bool, str]:
    raw = store.load_policy()
    if raw is None:
        return True, "none saved (eval uses lambda 0.25, T 1)"
    if not isinstance(raw, dict):
        return False, "the saved policy is not a JSON object: run `knnlm tune` again"
    if verify is None:
        return True, "saved (not read: no verifier given)"
    return True, verify(raw, store)


def _probe(store: KnnStore) -> tuple[bool, str]:
    store.probe()
    return True, "every key readable by the engine"


def _sample(store: KnnStore) -> tuple[bool, str]:
    assert store.meta is not None
    store.search(np.zeros((1, store.meta.dim), dtype=np.float32), k=1)
    for points, _ in store.scroll(batch=SAMPLE_POINTS):
        bad = int((~np.isfinite(points.keys)).any(axis=1).sum())
        if bad:
            return False, f"{bad:,} of the first {len(points):,} keys hold NaN or infinite values"
        return True, f"one search and the first {len(points):,} keys read back"
    return True, "no points yet"


def _scroll_all(store: KnnStore, on_progress: Progress) -> tuple[bool, str]:
    assert store.meta is not None
    seen = bad = 0
    counter = Counter(on_progress, "check", store.count())
    try:
        for points, _ in store.scroll(batch=4096):
            seen += len(points)
            bad += int((~np.isfinite(points.keys)).any(axis=1).sum())
            counter.add(len(points))
    except StoreError as exc:
        return False, f"reading stopped after {seen:,} points: {exc}"
    if bad:
        return False, f"{bad:,} of {seen:,} keys hold NaN or infinite values"
    expected = store.count()
    if seen != expected:
        return False, f"read {seen:,} points, but the collection counts {expected:,}"
    return True, f"read {seen:,} points, all keys finite ({_size(seen * store.meta.dim * 4)})"


def _size(n: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    i = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]} of float32"
