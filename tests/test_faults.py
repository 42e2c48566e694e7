"""Faults during ingest: a disk that fills up, kill -9 at random moments, and a store that
fails on the n-th write. Each must end in one error line (or a dead process), a store that
still opens and passes `knnlm check`, and a rerun that reaches exactly the clean count.

The ingests that die run as real processes (`python -m knnlm ingest`); the checks and reruns
after them run in-process, which keeps the many kill -9 trials within minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knn_store.errors import StoreError
from tests.files import write as _write
from tests.test_cli import Knnlm, _json_ok, _one_line_error

KILL_TRIALS = 20
KILL_SEED = 9


def _corpus(root: Path, n_files: int) -> Path:
    rng = np.random.default_rng(0)
    words = ["def", "add", "return", "class", "Stack", "push", "self", "print", "range", "for"]
    for i in range(n_files):
        _write(root / f"f{i:04d}.txt", " ".join(rng.choice(words, size=120)) + f"\n# {i}\n")
    return root


def _clean_count(model: Path, corpus: Path) -> int:
    """Points of a clean ingest: one per position of each distinct document."""
    from ingest.corpus import read_corpus
    from knn_store import KnnlmSettings, load_language_model

    lm = load_language_model(KnnlmSettings(model=str(model)))
    return sum(len(lm.encode(text)) - 1 for text in {d.text for d in read_corpus([corpus])})


def _process(knnlm: Knnlm, args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """`python -m knnlm ingest` as a real process, with the settings `knnlm` uses in-process."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KNNLM_")}
    env.update(
        KNNLM_MODEL_CACHE=str(knnlm.tmp / "cache"),
        KNNLM_THREADS="1",
        KNNLM_UPSERT_BATCH="64",
        OMP_NUM_THREADS="1",
    )
    return subprocess.Popen([sys.executable, "-m", "knnlm", *args], env=env, **popen)


def _ingest_args(knnlm: Knnlm, corpus: Path, data_dir: Path) -> list[str]:
    store = ["--data-dir", str(data_dir), "--collection", "test"]
    return ["ingest", str(corpus), *knnlm.model_args(), *store, "--upsert-batch", "64"]


def _assert_check_passes(knnlm: Knnlm, data_dir: Path) -> None:
    result = knnlm("check", "--data-dir", str(data_dir), "--collection", "test", "-q")
    assert result.exit_code == 0, result.output


# --- a full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(folder: Path, megabytes: int) -> Iterator[str]:
    """A filesystem of ``megabytes`` at ``folder``: tmpfs, else an ext4 image on a loop
    device; yields which. Skips the test where neither may be mounted."""
    folder.mkdir(parents=True)
    tried = []
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    kind = "tmpfs"
    if mounted.returncode != 0:
        tried.append(f"tmpfs: {mounted.stderr.strip()}")
        image = folder.with_suffix(".img")
        with image.open("wb") as handle:
            handle.truncate(megabytes * 2**20)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
        mounted = subprocess.run(
            ["mount", "-o", "loop", str(image), str(folder)], capture_output=True, text=True
        )
        kind = "ext4"
        if made.returncode != 0 or mounted.returncode != 0:
            tried.append(f"loop ext4: {(made.stderr + mounted.stderr).strip()}")
            pytest.skip("cannot mount a small filesystem here: " + "; ".join(tried))
    try:
        yield kind
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _remount(folder: Path, kind: str, megabytes: int) -> bool:
    """Give a tmpfs more room in place (an ext4 image cannot grow while mounted)."""
    if kind != "tmpfs":
        return False
    done = subprocess.run(
        ["mount", "-o", f"remount,size={megabytes}m", str(folder)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_a_full_disk_stops_ingest_in_one_line_and_a_rerun_with_room_completes(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    corpus = _corpus(tmp_path / "corpus", 100)
    clean = _clean_count(knnlm.model, corpus)
    disk = tmp_path / "disk"
    with _small_disk(disk, 48) as kind:
        data_dir = disk / "data"
        log = tmp_path / "stderr.log"
        with log.open("wb") as err:
            proc = _process(knnlm, [*_ingest_args(knnlm, corpus, data_dir), "-q"], stderr=err)
            proc.wait(timeout=300)
        stderr = log.read_text()
        # Qdrant Edge writes through memory maps: on a really full disk the process dies of
        # SIGBUS (-7), with no message. knnlm stops while room is left, in one line.
        assert proc.returncode == 1, (proc.returncode, stderr[-2000:])
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("knnlm: error: only "), stderr
        assert "free on the disk" in lines[0] and "run the same command again" in lines[0]
        written = re.search(r"([\d,]+) points were written", lines[0])

        # With the disk still nearly full, the store refuses to open in one line (opening
        # may fill the holes of its memory-mapped files) rather than dying.
        info = knnlm("info", "--data-dir", str(data_dir), "--collection", "test", "--json")
        if info.exit_code != 0:
            _one_line_error(info, "too little to open it")
        else:  # it opened after all: then it must tell the points that were written
            assert written is not None, stderr
            assert json.loads(info.stdout)["points"] == int(written[1].replace(",", ""))

        if not _remount(disk, kind, 400):  # else: the collection moves to a roomy disk
            roomy = tmp_path / "roomy"
            shutil.copytree(data_dir, roomy)
            data_dir = roomy
        _assert_check_passes(knnlm, data_dir)
        if written is not None:
            from knn_store.store.edge import EdgeStore

            with EdgeStore(data_dir / "test", create=False) as store:
                assert store.count() == int(written[1].replace(",", ""))
        store = ["--data-dir", str(data_dir), "--collection", "test"]
        again = _json_ok(knnlm("ingest", str(corpus), *knnlm.model_args(), *store, "-q", "--json"))
        assert again["points_total"] == clean
        _assert_check_passes(knnlm, data_dir)
    print(f"full disk ({kind} 48 MB): {lines[0]}")


# --- kill -9 at random moments ---------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from knn_store.store.edge import EdgeStore

    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    corpus = _corpus(tmp_path / "corpus", 40)
    clean = _clean_count(knnlm.model, corpus)

    # One clean run as a process, timed from the moment its collection folder appears.
    reference = tmp_path / "reference"
    started = None
    proc = _process(knnlm, [*_ingest_args(knnlm, corpus, reference), "-q", "--json"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None:
        if started is None and (reference / "test").exists():
            started = time.monotonic()
        time.sleep(0.005)
    assert started is not None and proc.stdout is not None
    assert json.loads(proc.stdout.read())["points_total"] == clean
    writing = time.monotonic() - started

    rng = random.Random(KILL_SEED)
    moments: Counter[str] = Counter()
    for trial in range(KILL_TRIALS):
        data_dir = tmp_path / f"trial{trial}"
        delay = rng.uniform(0.0, 1.1 * writing)
        proc = _process(knnlm, [*_ingest_args(knnlm, corpus, data_dir), "-q"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 120
        while not (data_dir / "test").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "ingest never started"
            time.sleep(0.002)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.kill()
        _, err = proc.communicate()
        if finished:
            assert proc.returncode == 0, err.decode()[-2000:]
        collection = data_dir / "test"
        where = f"trial {trial} (kill after {delay:.2f}s of {writing:.2f}s)"
        if not (collection / "meta.json").exists():
            moments["before the collection was complete"] += 1
            missing = knnlm("check", "--data-dir", str(data_dir), "--collection", "test", "-q")
            _one_line_error(missing, "no collection 'test'")
        else:
            with EdgeStore(collection, create=False) as store:  # it opens
                points = store.count()
            assert 0 <= points <= clean, where
            moments["after the run finished" if finished else "while writing"] += 1
            result = knnlm("check", "--data-dir", str(data_dir), "--collection", "test", "-q")
            assert result.exit_code == 0, (where, result.output)
        store_args = ["--data-dir", str(data_dir), "--collection", "test"]
        again = knnlm("ingest", str(corpus), *knnlm.model_args(), *store_args, "-q", "--json")
        out = _json_ok(again)
        assert out["points_total"] == clean, where  # nothing lost, nothing twice
        _assert_check_passes(knnlm, data_dir)
        with EdgeStore(collection, create=False) as store:
            per_doc = store.doc_counts()
        assert sum(per_doc.values()) == clean and len(per_doc) == 40, where
        shutil.rmtree(data_dir)
    print(f"kill -9: {KILL_TRIALS} trials, {dict(moments)}; 0 points lost or duplicated")
    assert moments["while writing"] >= KILL_TRIALS // 4, moments  # 15 of 20 when measured


# --- a store that fails on the n-th write ----------------------------------------------------


@pytest.mark.parametrize("fail_at", [1, 2, 7, 40])
def test_a_store_error_on_the_nth_upsert_is_one_line_and_a_rerun_resumes(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    fail_at: int,
) -> None:
    from knn_store.store.edge import EdgeStore

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    corpus = _corpus(tmp_path / "corpus", 20)
    clean = _clean_count(knnlm.model, corpus)
    assert clean > 64 * 40  # the last failure point still falls mid-ingest
    calls = 0
    upsert = EdgeStore.upsert

    def failing(self: EdgeStore, batch: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise StoreError(f"Qdrant Edge store {self.path} failed to write points: injected")
        upsert(self, batch)

    monkeypatch.setattr(EdgeStore, "upsert", failing)
    args = ["ingest", str(corpus), *knnlm.model_args(), *knnlm.store_args(), "-q"]
    line = _one_line_error(knnlm(*args, "--upsert-batch", "64"), "injected")
    written = (fail_at - 1) * 64
    assert f"{written:,} points were written before it failed" in line
    assert "run the same command again to resume" in line
    monkeypatch.setattr(EdgeStore, "upsert", upsert)

    with EdgeStore(knnlm.data_dir / "test", create=False) as store:
        assert store.count() == written  # what was acknowledged is there, nothing else
    _assert_check_passes(knnlm, knnlm.data_dir)
    again = _json_ok(knnlm(*args, "--json"))
    assert again["points_total"] == clean
    assert again["points_added"] == clean - written
    _assert_check_passes(knnlm, knnlm.data_dir)
