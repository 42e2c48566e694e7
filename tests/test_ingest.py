"""The ingest worker: exact point counts, idempotent re-runs, resume after failure or kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.corpus import Document, read_corpus
from ingest.worker import IngestWorker
from knn_store import CorpusError, KnnlmSettings, PointBatch, load_language_model, open_store


def _expected_points(lm, docs: list[Document]) -> int:
    unique = {d.text for d in docs}
    return sum(len(lm.encode(t)) - 1 for t in unique)


def _worker(lm, store, **kw) -> IngestWorker:
    args = dict(domain="code", window=16, stride=8, batch_size=2, upsert_batch=32)
    args.update(kw)
    return IngestWorker(lm, store, **args)


def test_ingest_stores_one_point_per_position_and_rerun_adds_nothing(
    tiny_model: Path, corpus_dir: Path, settings_factory
) -> None:
    settings = settings_factory(tiny_model)
    lm = load_language_model(settings)
    docs = list(read_corpus([corpus_dir]))
    store = open_store(settings, create=True)
    first = _worker(lm, store).run(docs)
    assert first.points_added == _expected_points(lm, docs) == store.count()
    assert first.tokens == first.points_added
    second = _worker(lm, store).run(docs)
    assert second.points_added == 0 and second.tokens == 0
    assert second.resumed == second.documents
    store.close()


def test_same_text_from_another_path_adds_nothing(
    tiny_models, corpus_dir: Path, settings_factory, tmp_path: Path
) -> None:
    settings = settings_factory(tiny_models["llama"])
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    _worker(lm, store).run(list(read_corpus([corpus_dir])))
    copy = tmp_path / "copy.txt"
    copy.write_text((corpus_dir / "doc0.txt").read_text())
    assert _worker(lm, store).run([Document(str(copy), copy.read_text())]).points_added == 0
    store.close()


def test_domains_are_added_incrementally(tiny_models, corpus_dir: Path, settings_factory) -> None:
    settings = settings_factory(tiny_models["llama"])
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    docs = list(read_corpus([corpus_dir]))
    a = _worker(lm, store, domain="a").run(docs[:3])
    b = _worker(lm, store, domain="b").run(docs[3:])
    assert store.domains() == {"a": a.points_added, "b": b.points_added}
    assert store.count() == a.points_added + b.points_added
    store.close()


class _FailingStore:
    """Wraps a store and fails on the n-th upsert, like a dropped connection."""

    def __init__(self, store, fail_at: int) -> None:
        self._store, self._left = store, fail_at

    def upsert(self, batch: PointBatch) -> None:
        self._left -= 1
        if self._left == 0:
            raise ConnectionError("connection dropped")
        self._store.upsert(batch)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def test_resume_after_failure_ends_like_a_clean_run(
    tiny_models, corpus_dir: Path, settings_factory, tmp_path: Path
) -> None:
    docs = list(read_corpus([corpus_dir]))
    clean_settings = settings_factory(tiny_models["gpt2"], data_dir=tmp_path / "clean")
    lm = load_language_model(clean_settings)
    clean = open_store(clean_settings, create=True)
    _worker(lm, clean, upsert_batch=8).run(docs)
    clean_count = clean.count()
    clean.close()

    settings = settings_factory(tiny_models["gpt2"], data_dir=tmp_path / "resumed")
    store = open_store(settings, create=True)
    with pytest.raises(ConnectionError):
        _worker(lm, _FailingStore(store, fail_at=30), upsert_batch=8).run(docs)
    partial = store.count()
    assert 0 < partial < clean_count
    again = _worker(lm, store, upsert_batch=8).run(docs)
    assert store.count() == clean_count
    assert 0 < again.resumed < again.documents  # finished documents were skipped
    store.close()


def test_corpus_without_tokens_writes_nothing(tiny_models, settings_factory) -> None:
    settings = settings_factory(tiny_models["gpt2"])
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    with pytest.raises(CorpusError, match="no documents"):
        _worker(lm, store).run([])
    assert store.meta is None and not (settings.data_dir / settings.collection).exists()
    store.close()


def test_window_longer_than_context_is_rejected(tiny_models, settings_factory) -> None:
    settings = settings_factory(tiny_models["gpt2"])
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    with pytest.raises(ValueError, match="context"):
        _worker(lm, store, window=4096)
    store.close()


def _big_corpus(root: Path, n_files: int = 100) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "add", "return", "class", "Stack", "push", "self", "print", "range", "for"]
    for i in range(n_files):
        text = " ".join(rng.choice(words, size=120)) + f"\n# file {i}\n"
        (root / f"f{i:04d}.txt").write_text(text)
    return root


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "knnlm", "ingest", *args]
    return subprocess.Popen(cmd, env={**os.environ, **env}, **kw)


def test_kill_9_then_rerun_gives_the_clean_count(tiny_models, tmp_path: Path) -> None:
    corpus = _big_corpus(tmp_path / "big")
    base_env = {
        "KNNLM_MODEL": str(tiny_models["llama"]),
        "KNNLM_MODEL_CACHE": str(tmp_path / "cache"),
        "KNNLM_WINDOW": "16",
        "KNNLM_STRIDE": "8",
        "KNNLM_UPSERT_BATCH": "64",
        "KNNLM_THREADS": "1",
    }
    clean_env = {**base_env, "KNNLM_DATA_DIR": str(tmp_path / "clean")}
    killed_env = {**base_env, "KNNLM_DATA_DIR": str(tmp_path / "killed")}

    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = _cli([str(corpus)], killed_env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        # Wait until several progress updates were printed: points are being written.
        while log.read_bytes().count(b"tok/s") < 5 and proc.poll() is None:
            assert time.monotonic() < deadline, "ingest never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]

    resumed = subprocess.run(
        [sys.executable, "-m", "knnlm", "ingest", str(corpus), "--json", "-q"],
        env={**os.environ, **killed_env},
        capture_output=True,
        text=True,
        check=True,
    )
    clean = subprocess.run(
        [sys.executable, "-m", "knnlm", "ingest", str(corpus), "--json", "-q"],
        env={**os.environ, **clean_env},
        capture_output=True,
        text=True,
        check=True,
    )
    resumed_summary, clean_summary = json.loads(resumed.stdout), json.loads(clean.stdout)
    assert resumed_summary["points_total"] == clean_summary["points_total"]
    assert 0 < resumed_summary["tokens"] < clean_summary["tokens"]  # the kill hit mid-way
    assert resumed_summary["resumed_documents"] > 0


def test_settings_reject_stride_above_window() -> None:
    with pytest.raises(ValueError, match="stride"):
        KnnlmSettings(window=8, stride=9)
