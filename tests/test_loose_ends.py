"""Loose ends a hostile user found in the store's edges, one test each (each failed before its
fix): an unreadable shard deleted by the next ingest, a server flag taken silently beside
``--backend edge``, and a server that never answers retried for minutes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from knn_store.errors import StoreDamaged, StoreUnavailable
from knn_store.store.client import QdrantClientStore
from knn_store.store.edge import SHARD_DIR, EdgeStore
from tests.test_cli import Knnlm, _one_line_error


def test_an_unreadable_shard_without_its_record_is_refused_and_kept(tmp_path: Path) -> None:
    """A shard folder that cannot be loaded (and has no meta.json) was taken as an empty
    leftover, and the next ingest deleted it. Now it is refused, named, and left alone."""
    folder = tmp_path / "docs"
    (folder / SHARD_DIR / "segments").mkdir(parents=True)
    precious = folder / SHARD_DIR / "segments" / "data.bin"
    precious.write_bytes(b"\x00" * 4096)
    (folder / SHARD_DIR / "edge_config.json").write_text("{not json")
    store = EdgeStore(folder)
    try:
        from knn_store.store.base import CollectionMeta

        meta = CollectionMeta("m", "f", "final", 4, 10, "t")
        with pytest.raises(StoreDamaged, match="cannot be read") as caught:
            store.ensure_collection(meta)
    finally:
        store.close()
    assert str(folder / SHARD_DIR) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert precious.read_bytes() == b"\x00" * 4096  # nothing deleted


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--url", "http://localhost:6333"), ("--prefer-grpc", None), ("--ca-cert", "ca.pem")],
)
def test_a_server_flag_beside_backend_edge_is_refused(
    tmp_path: Path, tiny_models: dict[str, Path], flag: str, value: str | None
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    (tmp_path / "ca.pem").write_text("x")
    if value is None:
        args = [flag]
    else:
        args = [flag, str(tmp_path / value) if flag == "--ca-cert" else value]
    result = knnlm("info", *knnlm.store_args(), "--backend", "edge", *args)
    _one_line_error(result, flag, "--backend is 'edge'")


def test_a_server_that_never_answers_is_given_up_within_the_timeout(mute_server: str) -> None:
    """Each attempt waited the whole timeout: 4 attempts of 60 s and the backoff between
    them kept a command waiting over 200 s. Now the call and its retries share the timeout."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot reach Qdrant"):
        QdrantClientStore.server(mute_server, collection="c", timeout=2, retries=5)
    waited = time.monotonic() - started
    # one attempt's 2 s, where 6 attempts and their backoff took 27.5 s (a wide margin: the
    # bound is what is tested, not the machine's speed)
    assert waited < 10, waited


# --- copies refuse what readers refuse -------------------------------------------------------


def _edge_collection(folder: Path, *, n: int = 300, nan_rows: int = 0) -> None:
    import numpy as np

    from knn_store.store.base import CollectionMeta, PointBatch
    from knn_store.store.point_ids import document_hash, make_point_ids

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n, 8)).astype(np.float32)
    keys[:nan_rows] = np.nan
    tokens = rng.integers(0, 50, n)
    ids = make_point_ids(document_hash("d", "t"), np.arange(n), tokens)
    payloads = [{"domain": "d", "doc": "t", "offset": i} for i in range(n)]
    store = EdgeStore(folder)
    try:
        store.ensure_collection(CollectionMeta("m", "f", "final", 8, 50, "t"))
        store.upsert(PointBatch(ids=ids, keys=keys, payloads=payloads))
        store.finalize()
        store.save_state()
    finally:
        store.close()


def test_a_copy_refuses_a_damaged_source(
    tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:
    """rebuild, push and snapshot copied what was left of a collection that eval refused
    (points lost since its last completed write), said the counts agreed, and `check` found
    the copy sound: the damage was laundered. Every copy now refuses what eval refuses."""
    from knn_store.store.base import PointFilter
    from tests.test_cli import _json_ok

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _json_ok(knnlm.ingest(str(corpus_dir), "-q", "--json"))
    store = EdgeStore(knnlm.data_dir / "test", create=False)
    try:  # points gone behind the record's back, as a lost file or a bad disk loses them
        import qdrant_edge as qe

        from knn_store.store.edge import _filter

        doc = sorted(store.doc_counts())[0]
        lost = qe.UpdateOperation.delete_points_by_filter(_filter(PointFilter(docs=(doc,))))
        store._require_shard().update(lost)  # the engine alone: the record is not told
        store.flush()
    finally:
        store.close()
    held = tmp_path / "held.txt"
    held.write_text("def add(a, b):\n    return a + b\n")
    evaluated = knnlm("eval", str(held), *knnlm.model_args(), *knnlm.store_args(), "-q")
    assert evaluated.exit_code != 0, "eval must refuse this store, or there is nothing to test"
    for command in (
        ["rebuild", *knnlm.store_args(), "--to-collection", "rb", "-q"],
        ["rebuild", *knnlm.store_args(), "--to-collection", "rb2", "--successors", "-q"],
        ["push", *knnlm.store_args(), "--to-local", str(tmp_path / "local"), "-q"],
        ["snapshot", "create", *knnlm.store_args(), "-q"],
    ):
        result = knnlm(*command)
        _one_line_error(result, "knnlm check")
    for copy in ("rb", "rb2"):
        assert not (knnlm.data_dir / copy / "meta.json").exists()


def test_a_copy_refuses_keys_that_are_not_numbers(tmp_path: Path) -> None:
    from knn_store.store.transfer import copy_collection

    _edge_collection(tmp_path / "src", nan_rows=3)
    source = EdgeStore(tmp_path / "src", create=False)
    target = EdgeStore(tmp_path / "dst")
    try:
        with pytest.raises(StoreDamaged, match=r"not finite.*knnlm check"):
            copy_collection(source, target)
        assert target.meta is None or target.meta.copying  # never marked a finished copy
    finally:
        source.close()
        target.close()


# --- records without their checksum ----------------------------------------------------------


@pytest.fixture
def ingested(tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path) -> Knnlm:
    from tests.test_cli import _json_ok

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _json_ok(knnlm.ingest(str(corpus_dir), "-q", "--json"))
    held = tmp_path / "held.txt"
    held.write_text("def add(a, b):\n    return a + b\n")
    return knnlm


def _eval(knnlm: Knnlm):
    held = knnlm.tmp / "held.txt"
    return knnlm("eval", str(held), *knnlm.model_args(), *knnlm.store_args(), "-q")


def test_a_record_stripped_of_its_checksum_is_refused(ingested: Knnlm) -> None:
    """With "checksum" deleted and the key type changed, check said sound and eval answered
    from the wrong key type."""
    import json

    path = ingested.data_dir / "test" / "meta.json"
    record = json.loads(path.read_text())
    del record["checksum"]
    record["key_type"] = "ffn_input" if record["key_type"] == "final" else "final"
    path.write_text(json.dumps(record))
    assert ingested("check", *ingested.store_args(), "-q").exit_code == 1
    _one_line_error(_eval(ingested), "no checksum", "knnlm check --seal-records")


def test_a_policy_file_holding_null_is_damage_not_none_saved(ingested: Knnlm) -> None:
    path = ingested.data_dir / "test" / "policy.json"
    path.write_text("null")
    _one_line_error(_eval(ingested), "tuned policy", "not a JSON object")
    assert ingested("check", *ingested.store_args(), "-q").exit_code == 1


def test_records_older_than_checksums_are_sealed_once_on_purpose(ingested: Knnlm) -> None:
    import json

    path = ingested.data_dir / "test" / "meta.json"
    record = json.loads(path.read_text())
    del record["checksum"]
    path.write_text(json.dumps(record))  # as a knnlm older than checksums wrote it
    assert _eval(ingested).exit_code == 1
    sealed = ingested("check", *ingested.store_args(), "-q", "--seal-records")
    assert sealed.exit_code == 0, sealed.output
    assert "sealed: collection record" in sealed.stdout
    assert "checksum" in json.loads(path.read_text())
    assert _eval(ingested).exit_code == 0
    again = ingested("check", *ingested.store_args(), "-q", "--seal-records")
    assert again.exit_code == 0 and "sealed" not in again.stdout


def test_an_empty_service_key_in_the_environment_is_refused(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """``KNNLM_SERVE_API_KEY=""`` started an open server, while a key of spaces was refused."""
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    for empty in ("", "   "):
        result = knnlm("serve", *knnlm.store_args(), env={"KNNLM_SERVE_API_KEY": empty})
        _one_line_error(result, "KNNLM_SERVE_API_KEY", "empty")


def test_the_batchers_counters_lose_no_count_across_threads() -> None:
    """Request threads (cancelling), the shutdown timer and the worker all count; the
    counters are changed under one lock, so concurrent counts all land."""
    import sys

    from knnlm.service.batcher import BatchStats

    stats = BatchStats()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [
            threading.Thread(
                target=lambda: [
                    (stats.add(cancelled=1), stats.tally("tokens", "score")) for _ in range(20_000)
                ]
            )
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert stats.cancelled == 6 * 20_000
    assert stats.tokens["score"] == 6 * 20_000


def test_loading_a_model_leaves_transformers_progress_bars_as_they_were(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers.utils import logging as hf_logging

    from knn_store import KnnlmSettings, load_language_model

    settings = KnnlmSettings(model=str(tiny_models["gpt2"]), model_cache=tmp_path / "cache")
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        load_language_model(settings)
        assert hf_logging.is_progress_bar_enabled() == enabled
    hf_logging.enable_progress_bar()


# --- messages that name the right thing ------------------------------------------------------


def test_messages_name_what_is_wrong(ingested: Knnlm, tmp_path: Path) -> None:
    import json

    knnlm = ingested
    binary = tmp_path / "skip" / "blob.txt"
    binary.parent.mkdir()
    binary.write_bytes(b"\x00\xff\x00" * 50)
    skipped = knnlm(
        "eval", str(binary.parent), *knnlm.model_args(), *knnlm.store_args(), "-q",
        "--skip-invalid",
    )  # fmt: skip
    assert skipped.exit_code == 1, skipped.output
    *notes, line = skipped.stderr.splitlines()  # each skipped file named, then the error
    assert line.startswith("knnlm: error: nothing to evaluate: no text"), line
    assert len(notes) == 1 and "blob.txt" in notes[0]
    weight = knnlm(
        "eval", str(knnlm.tmp / "held.txt"), *knnlm.model_args(), *knnlm.store_args(),
        "--cache-weight", "1",
    )  # fmt: skip
    _one_line_error(weight, "--cache-weight")
    made = knnlm("snapshot", "create", *knnlm.store_args(), "-q", "--json")
    assert made.exit_code == 0, made.output
    snapshot = json.loads(made.stdout)["path"]
    restore = knnlm(
        "snapshot", "restore", snapshot, *knnlm.store_args(), "--to-collection", "bad/name"
    )
    _one_line_error(restore, "--to-collection")
    pushed = knnlm(
        "push", *knnlm.store_args(), "--to-local", str(tmp_path / "pushed"),
        "--only-domain", "nosuch", "-q",
    )  # fmt: skip
    _one_line_error(pushed, "nosuch")
    assert not (tmp_path / "pushed").exists()  # nothing made for a copy that never began
    rebuilt = knnlm(
        "rebuild", *knnlm.store_args(), "--to-collection", "rb", "--only-domain", "nosuch"
    )
    _one_line_error(rebuilt, "nosuch")
    assert not (knnlm.data_dir / "rb").exists()


def test_tune_suggests_save_fixed_only_where_it_would_fit() -> None:
    from knn_store.errors import CorpusError
    from knn_store.tuning import check_tuning_size, tokens_needed

    fixed = tokens_needed("fixed", buckets=64, held_out=True)
    with pytest.raises(CorpusError) as few:
        check_tuning_size(fixed - 1, "buckets", buckets=64)
    assert "--save fixed" not in str(few.value)
    with pytest.raises(CorpusError) as enough:
        check_tuning_size(fixed, "buckets", buckets=64)
    assert "--save fixed" in str(enough.value)
    with pytest.raises(CorpusError) as learned:
        check_tuning_size(fixed - 1, "learned", buckets=64)
    assert "--save fixed" not in str(learned.value)


def test_every_serve_flag_has_an_environment_variable() -> None:
    import click

    from knnlm.serve import serve

    flags = [p for p in serve.params if isinstance(p, click.Option) and p.name != "help"]
    assert len(flags) > 20
    missing = [p.opts[0] for p in flags if not p.envvar and "KNNLM_" not in (p.help or "")]
    assert missing == []
