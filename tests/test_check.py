"""``knnlm check``, and the quick check ``knnlm info`` runs: a sound collection passes on both
engines; every kind of damage that can be made by hand fails, with a finding that names it.

One Edge collection is built per module; each damage test breaks a copy of it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from knn_store.errors import StoreError
from knn_store.store.base import PointBatch
from knn_store.store.point_ids import document_hash, document_key, make_point_ids
from tests.conftest import CORPUS_LINES
from tests.files import corrupt_wal, truncate_vector_files
from tests.files import write as _write
from tests.test_cli import Knnlm, _json_ok, _one_line_error

_FINDING = re.compile(r"^(.{22}) (ok  |FAIL)  (.*)$")
SOUND = [
    "record",
    "storage settings",
    "storage files",
    "payload indexes",
    "point counts",
    "policy",
    "keys (exact scan)",
    "keys (every point)",
]


def _corpus(root: Path) -> Path:
    for i, line in enumerate(CORPUS_LINES):
        _write(root / f"doc{i}.txt", line * 3)
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A sound Edge collection 'test', built once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("check")
    knnlm = Knnlm(root, tiny_models["gpt2"])
    # unquantized: the damage below is to the original keys, which the engine then reads
    # (a quantized copy cut short fails at open instead, a case of its own below)
    plain = ["--quantization", "none", "--no-vectors-on-disk"]
    _json_ok(knnlm.ingest(str(_corpus(root / "corpus")), *plain, "-q", "--json"))
    return knnlm.data_dir / "test"


def _copy_of(collection: Path, tmp_path: Path, model: Path) -> tuple[Knnlm, Path]:
    """A copy of ``collection`` as 'test' under ``tmp_path``, to damage."""
    knnlm = Knnlm(tmp_path, model)
    shutil.copytree(collection, knnlm.data_dir / "test")
    return knnlm, knnlm.data_dir / "test"


@pytest.fixture
def copy(pristine: Path, tmp_path: Path, tiny_models: dict[str, Path]) -> tuple[Knnlm, Path]:
    return _copy_of(pristine, tmp_path, tiny_models["gpt2"])


def _check(knnlm: Knnlm, *args: str) -> tuple[Result, dict[str, tuple[bool, str]]]:
    """Run `knnlm check -q` and parse its findings (what -> (ok, detail))."""
    result = knnlm("check", *knnlm.store_args(), "-q", *args)
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    findings = {}
    for line in result.stdout.splitlines():
        match = _FINDING.match(line)
        if match:
            findings[match[1].strip()] = (match[2] == "ok  ", match[3])
    return result, findings


def _assert_sound(knnlm: Knnlm, *args: str) -> dict[str, tuple[bool, str]]:
    result, findings = _check(knnlm, *args)
    assert result.exit_code == 0, result.output
    assert list(findings) == SOUND
    assert all(ok for ok, _ in findings.values()), findings
    assert result.stdout.splitlines()[-1] == "collection 'test' is sound"
    info = knnlm.info(*args)
    assert info.exit_code == 0, info.output
    return findings


def _assert_damaged(knnlm: Knnlm, what: str, *fragments: str) -> str:
    """check exits 1 with ``what`` failed (its detail holding ``fragments``), and info
    refuses the collection in one line; returns the failed detail."""
    result, findings = _check(knnlm)
    assert result.exit_code == 1, result.output
    assert what in findings, (what, result.stdout)
    ok, detail = findings[what]
    assert not ok, (what, detail)
    for fragment in fragments:
        assert fragment in detail, (fragment, detail)
    if what != "open":
        assert result.stderr.strip().splitlines()[-1] == "collection 'test' is damaged"
        _one_line_error(knnlm.info(), "'test'", "damaged")
    else:
        _one_line_error(knnlm.info(), *fragments)
    return detail


# --- sound collections -----------------------------------------------------------------------


def test_a_sound_edge_collection_passes(copy: tuple[Knnlm, Path]) -> None:
    knnlm, _ = copy
    findings = _assert_sound(knnlm)
    points = knnlm.info_json()["points"]
    assert f"{points:,} points; engine {points:,}" in findings["point counts"][1]
    assert f"read {points:,} points" in findings["keys (every point)"][1]


def test_a_sound_local_mode_collection_passes(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    local = ("--backend", "local")
    _json_ok(knnlm.ingest(str(_corpus(tmp_path / "corpus")), *local, "-q", "--json"))
    findings = _assert_sound(knnlm, *local)
    assert findings["record"][1].startswith("llama, key ffn_input, 32-d")


def test_still_sound_after_a_domain_drop_and_with_a_policy(
    copy: tuple[Knnlm, Path], tmp_path: Path
) -> None:
    knnlm, collection = copy
    extra = _write(tmp_path / "extra.txt", "while True:\n    break\n" * 3)
    _json_ok(knnlm.ingest(str(extra), "--domain", "extra", "-q", "--json"))
    _assert_sound(knnlm)
    dropped = knnlm("domains", "drop", "extra", "--yes", *knnlm.store_args())
    assert dropped.exit_code == 0, dropped.output
    (collection / "policy.json").write_text(json.dumps(_policy(collection)))
    findings = _assert_sound(knnlm)
    assert findings["policy"][1] == "fixed, T=2"


def _policy(collection: Path, **changes: object) -> dict[str, object]:
    """A saved policy record as `knnlm tune` writes it (sealed), for this collection's
    model."""
    from knn_store.store.records import seal

    meta = json.loads((collection / "meta.json").read_text())
    policy: dict[str, object] = {
        "policy": {"kind": "fixed", "lambda": 0.3},
        "temperature": 2.0,
        "k": 8,
        "model_fingerprint": meta["model_fingerprint"],
        "key_type": meta["key_type"],
        "gate": None,
        "domains": [],
        "report": {},
        "saved": "2026-01-01T00:00:00+00:00",
    }
    policy.update(changes)
    return seal(policy)


# --- damage ----------------------------------------------------------------------------------


def _delete_segments(collection: Path) -> None:
    shutil.rmtree(collection / "shard" / "segments")


def _truncate_payloads(collection: Path) -> None:
    for file in collection.glob("shard/segments/*/payload_storage/page_*.dat"):
        file.write_bytes(b"")


def _set_state(collection: Path, **changes: object) -> None:
    """The record of the last write changed, and sealed as knnlm writes it."""
    from knn_store.store.records import seal, unseal

    state = unseal(json.loads((collection / "state.json").read_text()), what="state")
    (collection / "state.json").write_text(json.dumps(seal({**state, **changes})))


def _set_meta(collection: Path, **changes: object) -> None:
    meta = json.loads((collection / "meta.json").read_text())
    meta.update(changes)
    (collection / "meta.json").write_text(json.dumps(meta))


# (damage, the finding that must fail, fragments of its detail)
DAMAGE: dict[str, tuple[Callable[[Path], object], str, tuple[str, ...]]] = {
    "vector file cut to 0 bytes": (truncate_vector_files, "keys (exact scan)", ("read back",)),
    "segments folder deleted": (_delete_segments, "payload indexes", ("doc", "domain")),
    "payload pages cut to 0 bytes": (_truncate_payloads, "keys (every point)", ("stopped",)),
    "write-ahead log garbled": (corrupt_wal, "open", ("write-ahead log",)),
    "shard folder deleted": (
        lambda c: shutil.rmtree(c / "shard"),
        "open",
        ("shard folder", "missing"),
    ),
    "shard settings garbled": (
        lambda c: (c / "shard" / "edge_config.json").write_text("{"),
        "open",
        ("edge_config.json",),
    ),
    "record is not JSON": (lambda c: (c / "meta.json").write_text("{"), "open", ("meta.json",)),
    "record without a dimension": (
        lambda c: _set_meta(c, dim=None),
        "open",
        ("meta.json", "edited by hand"),
    ),
    "record with another dimension": (
        lambda c: _set_meta(c, dim=16),
        "open",
        ("meta.json", "edited by hand"),
    ),
    "record with another key type": (
        lambda c: _set_meta(c, key_type="final"),
        "open",
        ("meta.json", "edited by hand"),
    ),
    "record with its checksum blanked": (
        lambda c: _set_meta(c, checksum=None, dim=None),
        "open",
        ("edited by hand",),
    ),
    "state says more points": (
        lambda c: _set_state(c, points=1_000_000),
        "point counts",
        ("lost since the last write",),
    ),
    "state edited by hand": (
        lambda c: (c / "state.json").write_text('{"points": 1}'),
        "storage files",
        ("state.json", "no checksum", "--seal-records"),
    ),
    "state is not JSON": (
        lambda c: (c / "state.json").write_text("[1,"),
        "point counts",
        ("state.json",),
    ),
    "policy is not JSON": (
        lambda c: (c / "policy.json").write_text("{"),
        "policy",
        ("policy.json",),
    ),
    "policy with a NaN temperature": (
        lambda c: (c / "policy.json").write_text(json.dumps(_policy(c, temperature=math.nan))),
        "policy",
        ("T=nan",),
    ),
    "learned policy with mismatched layers": (
        lambda c: (c / "policy.json").write_text(
            json.dumps(
                _policy(
                    c,
                    policy={
                        "kind": "learned",
                        "features": ["d_min", "cosine"],
                        "mean": [0, 0],
                        "std": [1, 1],
                        "layers": [[[[1.0, 2.0, 3.0]], [0.0]]],
                    },
                )
            )
        ),
        "policy",
        ("unreadable", "layer 0"),
    ),
    "policy for another model": (
        lambda c: (c / "policy.json").write_text(
            json.dumps(_policy(c, model_fingerprint="another"))
        ),
        "policy",
        ("another model",),
    ),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_is_found_and_named(copy: tuple[Knnlm, Path], name: str) -> None:
    knnlm, collection = copy
    damage, what, fragments = DAMAGE[name]
    damage(collection)
    _assert_damaged(knnlm, what, *fragments)


def test_a_lost_segment_fails_the_counts_and_the_commands_that_need_its_index(
    copy: tuple[Knnlm, Path],
) -> None:
    knnlm, collection = copy
    _delete_segments(collection)
    _, findings = _check(knnlm)
    ok, detail = findings["point counts"]
    assert not ok
    assert "lost its payload index on 'domain'" in detail, detail
    # what the write-ahead log still held is counted, and compared with the last write
    assert re.match(r"^[\d,]+ points; engine [\d,]+", detail), detail
    _one_line_error(knnlm("domains", "list", *knnlm.store_args()), "payload index", "'domain'")


def _nan_points(n: int, dim: int) -> PointBatch:
    h = document_hash("nan", "nan")
    ids = make_point_ids(h, np.arange(n), np.zeros(n, dtype=np.int64))
    payloads = [
        {"domain": "nan", "doc": document_key(h), "source": "x", "offset": i, "context": ""}
        for i in range(n)
    ]
    return PointBatch(ids=ids, keys=np.full((n, dim), np.nan, np.float32), payloads=payloads)


def test_keys_holding_nan_are_found_or_refused(
    copy: tuple[Knnlm, Path], tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from knn_store.store.client import QdrantClientStore
    from knn_store.store.edge import EdgeStore

    knnlm, collection = copy
    with EdgeStore(collection, create=False) as store:
        store.upsert(_nan_points(200, 32))
        store.finalize()
    detail = _assert_damaged(knnlm, "keys (every point)", "NaN or infinite")
    assert detail.startswith("200 of ")

    local = Knnlm(tmp_path / "local", tiny_models["gpt2"])
    flags = ("--backend", "local")
    _json_ok(local.ingest(str(_corpus(tmp_path / "corpus")), *flags, "-q", "--json"))
    with (
        QdrantClientStore.local(
            local.data_dir / "qdrant-local", collection="test", create=False
        ) as store,
        pytest.raises(StoreError, match="NaN"),
    ):
        store.upsert(_nan_points(200, 32))  # local mode refuses them at the door
    _assert_sound(local, *flags)


def test_a_local_collection_not_made_by_knnlm_is_refused(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from qdrant_client import QdrantClient, models

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    client = QdrantClient(path=str(knnlm.data_dir / "qdrant-local"))
    client.create_collection(
        "test", vectors_config=models.VectorParams(size=4, distance=models.Distance.EUCLID)
    )
    client.close()
    result = knnlm("check", *knnlm.store_args(), "--backend", "local", "-q")
    _one_line_error(result, "not made by knnlm")


def test_check_of_a_missing_collection(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _one_line_error(knnlm("check", *knnlm.store_args(), "-q"), "no collection 'test'")
    assert not knnlm.data_dir.exists()


def test_a_cut_quantized_copy_fails_at_open(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """The default storage (turbo4 in RAM, keys on disk): cutting its files breaks the open,
    which check and info name in one line instead of a traceback."""
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _json_ok(knnlm.ingest(str(_corpus(tmp_path / "corpus")), "-q", "--json"))
    assert knnlm.info_json()["storage"]["quantization"] == "turbo4"
    truncate_vector_files(knnlm.data_dir / "test")
    _assert_damaged(knnlm, "open", "key chunks hold 0 bytes", "needed")


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["cut to half", "cut to nothing"])
def test_short_key_files_of_the_default_storage_are_never_answered_from(
    tmp_path: Path, tiny_models: dict[str, Path], keep: float
) -> None:
    """The default storage with an HNSW-indexed segment (float16 keys in matrix.dat): a key
    file cut short is refused by every command that reads the collection, before the engine
    opens it (it would extend the file with zeros and answer from them)."""
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _json_ok(
        knnlm.ingest(
            str(_corpus(tmp_path / "corpus")), "--indexing-threshold-kb", "1", "-q", "--json"
        )
    )
    collection = knnlm.data_dir / "test"
    (matrix,) = collection.glob("shard/segments/*/vector_storage/matrix.dat")
    with matrix.open("r+b") as f:
        f.truncate(int(matrix.stat().st_size * keep))
    size = matrix.stat().st_size
    held = _write(tmp_path / "held.txt", CORPUS_LINES[0])
    valid = _write(tmp_path / "valid.txt", CORPUS_LINES[1] * 4)
    for result in (
        knnlm.eval(str(held)),
        knnlm.info(),
        knnlm.ingest(str(held), "-q"),
        knnlm("tune", str(valid), *knnlm.model_args(), *knnlm.store_args(), "-q"),
        knnlm("explain", "-t", CORPUS_LINES[0], *knnlm.model_args(), *knnlm.store_args()),
        knnlm("rebuild", *knnlm.store_args(), "--to-collection", "copy", "-q"),
        knnlm("push", *knnlm.store_args(), "--to-local", str(tmp_path / "local"), "-q"),
    ):
        _one_line_error(result, "damaged", "matrix.dat", "needed")
    assert matrix.stat().st_size == size  # nothing opened it, nothing "healed" it
    assert not (knnlm.data_dir / "copy").exists()
    result, findings = _check(knnlm)
    assert result.exit_code == 1 and not findings["open"][0]
    assert "matrix.dat" in findings["open"][1]


# --- content checksums ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A sound Edge collection in the default storage (turbo4 copy in RAM, float16 keys on
    disk) whose points sit in an HNSW-indexed segment: matrix.dat, quantized.data and the
    payload indexes' mmap files."""
    root = tmp_path_factory.mktemp("indexed")
    knnlm = Knnlm(root, tiny_models["gpt2"])
    threshold = ("--indexing-threshold-kb", "1")
    _json_ok(knnlm.ingest(str(_corpus(root / "corpus")), *threshold, "-q", "--json"))
    return knnlm.data_dir / "test"


@pytest.fixture
def indexed_copy(indexed: Path, tmp_path: Path, tiny_models: dict[str, Path]) -> tuple[Knnlm, Path]:
    return _copy_of(indexed, tmp_path, tiny_models["gpt2"])


def _segment_file(collection: Path, pattern: str) -> Path:
    files = sorted(collection.glob(f"shard/segments/*/{pattern}"), key=lambda f: -f.stat().st_size)
    assert files, f"no {pattern} under {collection}"
    return files[0]


def _random_bytes(path: Path, n: int = 64 * 1024, *, keep_time: bool = False) -> None:
    """Overwrite up to ``n`` bytes in the middle of ``path`` with random ones (its size
    kept; with ``keep_time`` its modification time too, as a failing disk does)."""
    st = path.stat()
    n = min(n, st.st_size)
    with path.open("r+b") as f:
        f.seek((st.st_size - n) // 2)
        f.write(np.random.default_rng(7).bytes(n))
    if keep_time:
        import os

        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_byte(path: Path, *, keep_time: bool = False) -> None:
    import os

    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_time:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _readers_refuse(knnlm: Knnlm, tmp_path: Path, *fragments: str) -> None:
    held = _write(tmp_path / "held.txt", CORPUS_LINES[0])
    for result in (
        knnlm.eval(str(held)),
        knnlm.eval(str(held), "--rescore"),
        knnlm.info(),
        knnlm("rebuild", *knnlm.store_args(), "--to-collection", "copy", "-q"),
    ):
        _one_line_error(result, "damaged", *fragments)


KEY_DAMAGE = {
    "64 KB of random bytes in quantized.data": (
        lambda c: _random_bytes(_segment_file(c, "vector_storage/quantized.data")),
        "quantized.data",
    ),
    "one flipped byte in matrix.dat": (
        lambda c: _flip_byte(_segment_file(c, "vector_storage/matrix.dat")),
        "matrix.dat",
    ),
    "64 KB of random bytes in matrix.dat": (
        lambda c: _random_bytes(_segment_file(c, "vector_storage/matrix.dat")),
        "matrix.dat",
    ),
}


@pytest.mark.parametrize("name", list(KEY_DAMAGE))
def test_key_damage_is_seen_by_check_and_refused_by_every_reader(
    indexed_copy: tuple[Knnlm, Path], tmp_path: Path, name: str
) -> None:
    """Random bytes in the quantized copy moved eval's numbers, and a flipped byte in the
    keys went unseen: check said sound. With 58 NaN keys found, eval --rescore still ran."""
    knnlm, collection = indexed_copy
    damage, file = KEY_DAMAGE[name]
    damage(collection)
    _assert_damaged(knnlm, "storage files", file, "content checksum")
    _readers_refuse(knnlm, tmp_path, file, "content checksum")
    assert not (knnlm.data_dir / "copy").exists()


@pytest.mark.parametrize(
    "pattern",
    [
        "payload_index/*-doc-map/point_to_values.bin",
        "payload_index/*-doc-map/values_to_points.bin",
        "payload_index/*-domain-null/has_values/flags_a.dat",
        "payload_storage/page_0.dat",
    ],
    ids=lambda p: p.rsplit("/", 1)[-1],
)
def test_payload_index_files_cut_to_half_are_seen(
    indexed_copy: tuple[Knnlm, Path], pattern: str
) -> None:
    """Half-cut payload-index files gave no wrong number here, and check said sound."""
    knnlm, collection = indexed_copy
    file = _segment_file(collection, pattern)
    with file.open("r+b") as f:
        f.truncate(file.stat().st_size // 2)
    _assert_damaged(knnlm, "storage files", file.name)


def test_damage_that_kept_its_time_is_found_by_check_and_then_refused(
    indexed_copy: tuple[Knnlm, Path], tmp_path: Path
) -> None:
    """A failing disk changes bytes, not times: readers compare sizes and times only, so
    only check, which hashes every file, sees it. What it found is kept with the store:
    every reader refuses it until a check finds it sound again."""
    knnlm, collection = indexed_copy
    matrix = _segment_file(collection, "vector_storage/matrix.dat")
    original = matrix.read_bytes()
    held = _write(tmp_path / "held.txt", CORPUS_LINES[0])
    _flip_byte(matrix, keep_time=True)
    assert knnlm.eval(str(held)).exit_code == 0  # unseen by a reader's cheap look
    _assert_damaged(knnlm, "storage files", "matrix.dat", "content checksum")
    _readers_refuse(knnlm, tmp_path, "check", "matrix.dat", "content checksum")
    matrix.write_bytes(original)  # repaired (a snapshot restored, say)
    _assert_sound(knnlm)
    assert knnlm.eval(str(held)).exit_code == 0


def test_a_record_of_the_last_write_from_before_checksums_is_sealed_once(
    indexed_copy: tuple[Knnlm, Path], tmp_path: Path
) -> None:
    """A collection written by a knnlm older than content checksums (state.json with only
    its point count, unsealed) is refused by readers, naming the one-time upgrade; `check
    --seal-records` checks everything, then records the checksums, and readers accept it."""
    knnlm, collection = indexed_copy
    points = json.loads((collection / "state.json").read_text())["points"]
    (collection / "state.json").write_text(json.dumps({"points": points}))
    held = _write(tmp_path / "held.txt", CORPUS_LINES[0])
    _one_line_error(knnlm.eval(str(held)), "state.json", "--seal-records")
    result, findings = _check(knnlm, "--seal-records")
    assert result.exit_code == 0, result.output
    assert "sealed: " in result.stdout and "state.json" in result.stdout
    findings = _assert_sound(knnlm)
    assert "as last written (hashed)" in findings["storage files"][1]
    state = json.loads((collection / "state.json").read_text())
    assert state["points"] == points and state["files"] and state["checksum"]
    assert knnlm.eval(str(held)).exit_code == 0
    _flip_byte(_segment_file(collection, "vector_storage/matrix.dat"))
    _one_line_error(knnlm.eval(str(held)), "matrix.dat", "content checksum")


def test_an_interrupted_write_is_not_taken_for_damage(
    indexed_copy: tuple[Knnlm, Path], tmp_path: Path
) -> None:
    """A write killed before it completed leaves its files unlike their checksums: the
    record says a write is under way, readers answer (nothing lost: the write-ahead log
    holds it), and the next completed write records the checksums again."""
    from knn_store.store.edge import EdgeStore

    knnlm, collection = indexed_copy
    store = EdgeStore(collection, create=False)
    batch = _points_like(collection, n=50)
    store.upsert(batch)
    store.flush()
    store._close_shard()  # the process dies here: no finalize, no close of the store
    store._release_lock()
    state = json.loads((collection / "state.json").read_text())
    assert state["writing"] and "files" not in state
    held = _write(tmp_path / "held.txt", CORPUS_LINES[0])
    assert knnlm.eval(str(held)).exit_code == 0
    _json_ok(knnlm.ingest(str(held), "-q", "--json"))  # a completed write
    assert "files" in json.loads((collection / "state.json").read_text())
    _assert_sound(knnlm)


def _points_like(collection: Path, *, n: int) -> PointBatch:
    dim = json.loads((collection / "meta.json").read_text())["dim"]
    h = document_hash("extra", "extra")
    ids = make_point_ids(h, np.arange(n), np.zeros(n, dtype=np.int64))
    payloads = [
        {"domain": "extra", "doc": document_key(h), "source": "x", "offset": i, "context": ""}
        for i in range(n)
    ]
    keys = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    return PointBatch(ids=ids, keys=keys, payloads=payloads)
