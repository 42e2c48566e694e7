"""Backups (``knnlm snapshot``): a collection taken into one file and given back, on Edge,
in qdrant-client's local mode and on a real server, and across them.

A restore must give back the same points, record, policy and search results (and so the same
``knnlm eval`` numbers), and must never leave anything half-restored that looks like a
collection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knn_store import (
    ConfigError,
    PointBatch,
    PointFilter,
    StoreDamaged,
    StoreError,
    StoreLocked,
)
from knn_store.store.base import KnnStore
from knn_store.store.check import check_collection
from knn_store.store.client import QdrantClientStore
from knn_store.store.config import SearchOptions, StorageConfig
from knn_store.store.edge import EdgeStore
from knn_store.store.point_ids import document_hash, make_point_ids
from knn_store.store.snapshot import (
    MANIFEST,
    SERVER_MEMBER,
    SUFFIX,
    Snapshot,
    create_snapshot,
    find_snapshot,
    list_snapshots,
    read_snapshot,
    restore_snapshot,
    snapshot_folder,
)
from tests.qdrant_server import Server
from tests.test_cli import Knnlm, _json_ok, _one_line_error
from tests.test_store import META

DIM = META.dim
POLICY: dict[str, Any] = {
    "policy": {"kind": "fixed", "lambda": 0.4},
    "temperature": 2.5,
    "k": 8,
    "model_fingerprint": META.model_fingerprint,
    "key_type": META.key_type,
    "gate": None,
    "domains": [],
    "report": {},
    "saved": "2026-01-01T00:00:00+00:00",
}


def _fill(store: KnnStore, n: int = 500, seed: int = 0) -> np.ndarray:
    """``n`` points in two domains and five documents, the policy, and the index built;
    returns some queries."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DIM)).astype(np.float32)
    tokens = rng.integers(0, META.vocab_size, n)
    ids = make_point_ids(document_hash("d", str(seed)), np.arange(n), tokens)
    payloads = [
        {"domain": "code" if i % 3 else "prose", "doc": f"doc{i % 5}", "offset": i}
        for i in range(n)
    ]
    store.ensure_collection(META)
    store.upsert(PointBatch(ids=ids, keys=keys, payloads=payloads))
    store.save_policy(POLICY)
    store.finalize()
    return keys[:20] + 0.05


def _contents(store: KnnStore) -> dict[str, Any]:
    """Every point (key and payload), the record and the policy."""
    points = {}
    for batch, _ in store.scroll(batch=256):
        for pid, key, payload in zip(batch.ids, batch.keys, batch.payloads, strict=True):
            points[pid] = (key.tobytes(), json.dumps(payload, sort_keys=True))
    assert store.meta is not None
    return {"points": points, "record": store.meta.to_dict(), "policy": store.load_policy()}


def _results(store: KnnStore, queries: np.ndarray, exact: bool = True) -> tuple[Any, ...]:
    """The neighbours' ids and tokens, and their distances rounded below what two engines'
    float arithmetic may differ by."""
    found = store.search(queries, k=10, options=SearchOptions(exact=exact))
    assert found.point_ids is not None
    ids = [[str(pid) for pid in row] for row in found.point_ids]
    return ids, found.token_ids.tolist(), np.round(found.sq_distances, 3).tolist()


def _visible(data_dir: Path) -> list[str]:
    """What a listing of the data folder shows, hidden folders included (but not the lock
    files of embedded collections)."""
    if not data_dir.exists():
        return []
    return sorted(p.name for p in data_dir.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def edge(tmp_path: Path) -> tuple[Path, np.ndarray, dict[str, Any], tuple[Any, ...]]:
    """An embedded collection 'c' in ``tmp/data``: (data dir, queries, contents, results
    of an HNSW search)."""
    data_dir = tmp_path / "data"
    with EdgeStore(data_dir / "c") as store:
        queries = _fill(store)
        return data_dir, queries, _contents(store), _results(store, queries, exact=False)


def _snapshot_edge(data_dir: Path, name: str = "c") -> Snapshot:
    with EdgeStore(data_dir / name, create=False) as store:
        return create_snapshot(store, folder=snapshot_folder(data_dir, name))


# --- Edge ------------------------------------------------------------------------------------


def test_edge_round_trip_after_a_drop(edge) -> None:
    data_dir, queries, contents, hnsw = edge
    snap = _snapshot_edge(data_dir)
    m = snap.manifest
    assert (m.kind, m.collection, m.points, m.domains) == (
        "edge",
        "c",
        500,
        {"code": 333, "prose": 167},
    )
    assert m.policy == POLICY and m.record == META.to_dict()
    assert snap.path.parent == data_dir / ".snapshots" / "c" and snap.name.endswith(SUFFIX)
    logical = sum(f["size"] for f in m.files.values())
    assert snap.size < logical / 20  # preallocated zeros are not stored
    shutil.rmtree(data_dir / "c")

    report = restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)
    assert (report.points, report.policy, report.replaced) == (500, True, False)
    with EdgeStore(data_dir / "c", create=False) as store:
        assert _contents(store) == contents
        assert _results(store, queries, exact=False) == hnsw  # the same index files
        assert (store.load_state() or {})["points"] == 500
    assert _visible(data_dir) == [".snapshots", "c"]  # no staging folder left behind


def test_edge_replace_a_corrupt_collection(edge) -> None:
    data_dir, queries, contents, hnsw = edge
    snap = _snapshot_edge(data_dir)
    shutil.rmtree(data_dir / "c" / "shard" / "segments")
    with EdgeStore(data_dir / "c", create=False) as store:
        assert not check_collection(store, full=False).ok

    with pytest.raises(StoreError, match=r"exists.*--replace"):
        restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)
    report = restore_snapshot(snap, "c", backend="edge", data_dir=data_dir, replace=True)
    assert report.replaced
    with EdgeStore(data_dir / "c", create=False) as store:
        assert _contents(store) == contents
        assert _results(store, queries, exact=False) == hnsw
    assert _visible(data_dir) == [".snapshots", "c"]  # the old folder is gone too


def test_edge_restore_under_another_name_leaves_the_original(edge) -> None:
    data_dir, queries, contents, hnsw = edge
    snap = _snapshot_edge(data_dir)
    restore_snapshot(snap, "copy", backend="edge", data_dir=data_dir)
    for name in ("c", "copy"):
        with EdgeStore(data_dir / name, create=False) as store:
            assert _contents(store) == contents
            assert _results(store, queries, exact=False) == hnsw


def test_edge_refuses_to_replace_a_collection_in_use(edge) -> None:
    data_dir = edge[0]
    snap = _snapshot_edge(data_dir)
    with EdgeStore(data_dir / "c", create=False) as held:
        with pytest.raises(StoreLocked, match="in use"):
            restore_snapshot(snap, "c", backend="edge", data_dir=data_dir, replace=True)
        assert held.count() == 500


def _flip_a_data_byte(path: Path) -> None:
    """Change one byte inside the stored vectors of a snapshot file."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith("chunk_0.mmap"))
        offset = member.offset_data + (member.sparse[0][0] if member.sparse else 0) + 600
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not a snapshot"])
def test_a_damaged_snapshot_changes_nothing(edge, damage: str) -> None:
    data_dir, _, contents, _ = edge
    snap = _snapshot_edge(data_dir)
    if damage == "flipped byte":
        _flip_a_data_byte(snap.path)
        match = "does not match its checksum"
    elif damage == "truncated":
        with snap.path.open("r+b") as f:
            f.truncate(snap.size // 2)
        match = "truncated or damaged"
    else:
        snap.path.write_bytes(b"hello" * 1000)
        match = "not a readable knnlm snapshot"
    with pytest.raises(StoreDamaged, match=match):
        restore_snapshot(
            read_snapshot(snap.path), "c", backend="edge", data_dir=data_dir, replace=True
        )
    with pytest.raises(StoreDamaged, match=match):
        restore_snapshot(read_snapshot(snap.path), "new", backend="edge", data_dir=data_dir)
    assert _visible(data_dir) == [".snapshots", "c"]  # nothing new, not even hidden
    with EdgeStore(data_dir / "c", create=False) as store:  # the old one is untouched
        assert _contents(store) == contents


def test_a_restore_killed_midway_leaves_no_collection(
    edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything cut short stays in a hidden folder, which the next restore clears."""
    from knn_store.store import restore as module

    data_dir = edge[0]
    snap = _snapshot_edge(data_dir)
    shutil.rmtree(data_dir / "c")

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_verify", killed)
    with pytest.raises(KeyboardInterrupt):
        restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)
    assert _visible(data_dir) == [".snapshots"]
    (data_dir / ".c.restoring-deadbeef" / "c").mkdir(parents=True)  # as a kill -9 leaves it
    monkeypatch.undo()
    restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)
    assert _visible(data_dir) == [".snapshots", "c"]


def test_snapshot_files_are_plain_tar(edge, tmp_path: Path) -> None:
    """GNU tar unpacks a snapshot (sparse members included) to the manifest's checksums."""
    if shutil.which("tar") is None:
        pytest.skip("no tar executable")
    snap = _snapshot_edge(edge[0])
    out = tmp_path / "untarred"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(snap.path), "-C", str(out)], check=True)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["points"] == 500
    for name, f in manifest["files"].items():
        data = (out / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"]), name


def test_list_and_find_snapshots(edge) -> None:
    data_dir = edge[0]
    folder = snapshot_folder(data_dir, "c")
    first = _snapshot_edge(data_dir)
    second = _snapshot_edge(data_dir)
    assert first.path != second.path
    (folder / f"junk{SUFFIX}").write_text("not a tar")
    (folder / "notes.txt").write_text("ignored")
    found, unreadable = list_snapshots([folder, data_dir / "missing"])
    assert [s.path for s in found] == [first.path, second.path]
    assert [p.name for p, _ in unreadable] == [f"junk{SUFFIX}"]
    assert find_snapshot(second.name.removesuffix(SUFFIX), [folder]).path == second.path
    assert find_snapshot(str(first.path), []).path == first.path
    with pytest.raises(ConfigError, match="no snapshot 'nope'"):
        find_snapshot("nope", [folder])


def test_create_refuses_a_damaged_collection(edge) -> None:
    data_dir = edge[0]
    shutil.rmtree(data_dir / "c" / "shard" / "segments")  # its payload indexes with them
    with (
        EdgeStore(data_dir / "c", create=False) as store,
        pytest.raises(StoreDamaged, match="damaged"),
    ):
        create_snapshot(store, folder=snapshot_folder(data_dir, "c"))
    assert not snapshot_folder(data_dir, "c").exists()


# --- qdrant-client's local mode, and across backends -------------------------------------------


def _local(data_dir: Path) -> Callable[[str], KnnStore]:
    return lambda name: QdrantClientStore.local(data_dir / "qdrant-local", collection=name)


def test_local_mode_round_trip_and_onto_edge(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    open_local = _local(data_dir)
    with open_local("c") as store:
        queries = _fill(store)
        contents, exact = _contents(store), _results(store, queries)
        snap = create_snapshot(store, folder=snapshot_folder(data_dir, "c"))
    assert (snap.manifest.kind, snap.manifest.source["backend"]) == ("edge", "local")

    with pytest.raises(StoreError, match="exists"):
        restore_snapshot(snap, "c", backend="local", data_dir=data_dir, open_collection=open_local)
    with open_local("c") as store:
        store.drop()
    restore_snapshot(snap, "c", backend="local", data_dir=data_dir, open_collection=open_local)
    with open_local("c") as store:
        assert _contents(store) == contents
        assert _results(store, queries) == exact

    restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)  # across backends
    with EdgeStore(data_dir / "c", create=False) as store:
        assert _contents(store) == contents
        assert _results(store, queries) == exact


def test_edge_snapshot_onto_local_mode(edge) -> None:
    data_dir, queries, contents, _ = edge
    snap = _snapshot_edge(data_dir)
    open_local = _local(data_dir)
    with EdgeStore(data_dir / "c", create=False) as store:
        exact = _results(store, queries)
    restore_snapshot(snap, "c", backend="local", data_dir=data_dir, open_collection=open_local)
    with open_local("c") as store:
        assert _contents(store) == contents
        assert _results(store, queries) == exact
    assert _visible(data_dir) == [".snapshots", "c", "qdrant-local"]


# --- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def knnlm(tmp_path: Path, tiny_models: dict[str, Path]) -> Knnlm:
    return Knnlm(tmp_path, tiny_models["gpt2"])


def _policy_for(collection: Path) -> dict[str, Any]:
    from knn_store.store.records import seal

    meta = json.loads((collection / "meta.json").read_text())
    return seal(
        {**POLICY, "model_fingerprint": meta["model_fingerprint"], "key_type": meta["key_type"]}
    )


def test_cli_round_trip_gives_the_same_eval(knnlm: Knnlm, corpus_dir: Path) -> None:
    _json_ok(knnlm.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    collection = knnlm.data_dir / "test"
    (collection / "policy.json").write_text(json.dumps(_policy_for(collection)))
    before = _json_ok(knnlm.eval(str(corpus_dir), "--exact", "--json", "-q"))
    assert before["policy_source"] != "default" and before["temperature"] == 2.5

    made = _json_ok(knnlm("snapshot", "create", *knnlm.store_args(), "-q", "--json"))
    assert made["points"] == knnlm.info_json()["points"] and made["policy"]
    listed = knnlm("snapshot", "list", *knnlm.store_args(), "--json")
    assert listed.exit_code == 0 and [s["name"] for s in json.loads(listed.stdout)] == [
        made["name"]
    ]

    shutil.rmtree(collection / "shard" / "segments")  # corrupt it
    assert knnlm.eval(str(corpus_dir), "--exact", "--json", "-q").exit_code == 1
    _one_line_error(
        knnlm("snapshot", "restore", made["name"], *knnlm.store_args(), "-q"), "--replace"
    )
    restored = knnlm("snapshot", "restore", made["name"], *knnlm.store_args(), "--replace")
    assert restored.exit_code == 0, restored.output
    assert f"restored 'test' at {collection}, replacing the old one" in restored.stdout

    same = ("base_perplexity", "knn_perplexity", "tokens", "policy", "temperature", "k")
    after = _json_ok(knnlm.eval(str(corpus_dir), "--exact", "--json", "-q"))
    assert {k: after[k] for k in same} == {k: before[k] for k in same}

    # a copy of the file elsewhere, restored under the name it was taken from
    shutil.rmtree(collection)
    copy = knnlm.tmp / made["name"]
    shutil.copy(made["path"], copy)
    restored = knnlm("snapshot", "restore", str(copy), "--data-dir", str(knnlm.data_dir), "-q")
    assert restored.exit_code == 0, restored.output
    again = _json_ok(knnlm.eval(str(corpus_dir), "--exact", "--json", "-q"))
    assert {k: again[k] for k in same} == {k: before[k] for k in same}


def test_cli_errors_are_one_line(knnlm: Knnlm, tmp_path: Path) -> None:
    _one_line_error(knnlm("snapshot", "create", *knnlm.store_args(), "-q"), "no collection")
    _one_line_error(
        knnlm("snapshot", "restore", "nope", *knnlm.store_args(), "-q"), "no snapshot 'nope'"
    )
    junk = tmp_path / f"junk{SUFFIX}"
    junk.write_text("junk")
    _one_line_error(
        knnlm("snapshot", "restore", str(junk), *knnlm.store_args(), "-q"), "not a readable"
    )


# --- a real server -----------------------------------------------------------------------------


def _server_store(server: Server, name: str) -> QdrantClientStore:
    return QdrantClientStore.server(
        server.url,
        collection=name,
        api_key=server.api_key,
        grpc_port=server.grpc_port,
        ca_cert=server.ca_cert,
    )


@pytest.fixture
def server_names(qdrant_server: Server):
    """A unique collection-name prefix; every collection under it is dropped afterwards."""
    prefix = f"snap-{uuid.uuid4().hex[:8]}"
    yield prefix
    qdrant_server.drop_collections(prefix)


@pytest.mark.server
def test_server_round_trip(qdrant_server: Server, server_names: str, tmp_path: Path) -> None:
    data_dir, name = tmp_path / "data", f"{server_names}-c"

    def open_server(n: str) -> KnnStore:
        return _server_store(qdrant_server, n)

    with open_server(name) as store:
        queries = _fill(store)
        contents, exact = _contents(store), _results(store, queries)
        snap = create_snapshot(store, folder=snapshot_folder(data_dir, name))
    m = snap.manifest
    assert (m.kind, m.points, m.source["backend"]) == ("server", 500, "qdrant")
    assert list(m.files) == [SERVER_MEMBER]
    # the server's own snapshot carries the record and the policy in its metadata
    with tarfile.open(snap.path) as outer:
        inner_file = outer.extractfile(SERVER_MEMBER)
        assert inner_file is not None
        with tarfile.open(fileobj=inner_file) as inner:
            config_file = inner.extractfile("config.json")
            assert config_file is not None
            metadata = json.loads(config_file.read())["metadata"]
    sealed = {k: v for k, v in metadata["knnlm"].items() if k != "checksum"}
    policy = {k: v for k, v in metadata["knnlm_policy"].items() if k != "checksum"}
    assert sealed == META.to_dict() == m.record and policy == POLICY == m.policy
    client = qdrant_server.client()
    try:
        assert client.list_snapshots(name) == []  # downloaded, then deleted on the server
    finally:
        client.close()

    with pytest.raises(StoreError, match="exists"):
        restore_snapshot(
            snap, name, backend="qdrant", data_dir=data_dir, open_collection=open_server
        )
    with open_server(name) as store:
        store.drop()
    restore_snapshot(snap, name, backend="qdrant", data_dir=data_dir, open_collection=open_server)
    with open_server(name) as store:
        assert _contents(store) == contents
        assert _results(store, queries) == exact
        store.delete(PointFilter(domains=("prose",)))  # changed after the snapshot
        assert store.count() == 333
    report = restore_snapshot(
        snap, name, backend="qdrant", data_dir=data_dir, open_collection=open_server, replace=True
    )
    assert report.replaced
    with open_server(name) as store:
        assert _contents(store) == contents
    assert _visible(data_dir) == [".snapshots"]


@pytest.mark.server
def test_edge_snapshot_onto_a_server(edge, qdrant_server: Server, server_names: str) -> None:
    data_dir, queries, contents, _ = edge
    snap = _snapshot_edge(data_dir)
    with EdgeStore(data_dir / "c", create=False) as store:
        exact = _results(store, queries)
    name = f"{server_names}-from-edge"

    def open_server(n: str) -> KnnStore:
        return _server_store(qdrant_server, n)

    report = restore_snapshot(
        snap, name, backend="qdrant", data_dir=data_dir, open_collection=open_server
    )
    assert report.points == 500
    with open_server(name) as store:
        assert _contents(store) == contents
        assert _results(store, queries) == exact
        assert store.collection_exists(f"{name}.restoring") is False  # the staging is gone
    assert _visible(data_dir) == [".snapshots", "c"]


@pytest.mark.server
def test_server_snapshot_onto_edge(
    qdrant_server: Server, server_names: str, tmp_path: Path
) -> None:
    data_dir, name = tmp_path / "data", f"{server_names}-to-edge"
    with _server_store(qdrant_server, name) as store:
        queries = _fill(store)
        contents, exact = _contents(store), _results(store, queries)
        snap = create_snapshot(store, folder=snapshot_folder(data_dir, name))
    restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)
    with EdgeStore(data_dir / "c", create=False) as store:
        assert _contents(store) == contents
        assert _results(store, queries) == exact
    assert _visible(data_dir) == [".snapshots", "c"]


@pytest.mark.server
def test_a_server_snapshot_of_two_shards_is_refused_on_edge(
    qdrant_server: Server, server_names: str, tmp_path: Path
) -> None:
    data_dir, name = tmp_path / "data", f"{server_names}-sharded"
    two_shards = dataclasses.replace(META, storage=StorageConfig(shard_number=2))
    with _server_store(qdrant_server, name) as store:
        store.ensure_collection(two_shards)
        _fill(store)
        snap = create_snapshot(store, folder=snapshot_folder(data_dir, name))
    with pytest.raises(StoreError, match="2 shards, and Qdrant Edge holds one") as refused:
        restore_snapshot(snap, "c", backend="edge", data_dir=data_dir)
    assert "restore it onto a server" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert _visible(data_dir) == [".snapshots"]


@pytest.mark.server
def test_cli_server_round_trip_gives_the_same_eval(
    knnlm: Knnlm, corpus_dir: Path, qdrant_server: Server, server_names: str
) -> None:
    server, env = qdrant_server.cli_args(), qdrant_server.env()
    name = f"{server_names}-cli"
    args = [*server, "--data-dir", str(knnlm.data_dir), "--collection", name]
    ingested = knnlm("ingest", *knnlm.model_args(), *args, str(corpus_dir), "-q", "--json", env=env)
    _json_ok(ingested)
    before = _json_ok(
        knnlm(
            "eval", *knnlm.model_args(), *args, str(corpus_dir), "--exact", "-q", "--json", env=env
        )
    )
    made = _json_ok(knnlm("snapshot", "create", *args, "-q", "--json", env=env))
    assert (made["kind"], made["source"]) == ("server", "qdrant")
    client = qdrant_server.client()
    try:
        client.delete_collection(name)
    finally:
        client.close()
    restored = knnlm("snapshot", "restore", made["name"], *args, "-q", env=env)
    assert restored.exit_code == 0, restored.output
    assert f"restored {name!r} at {qdrant_server.url}" in restored.stdout
    after = _json_ok(
        knnlm(
            "eval", *knnlm.model_args(), *args, str(corpus_dir), "--exact", "-q", "--json", env=env
        )
    )
    same = ("base_perplexity", "knn_perplexity", "tokens", "policy", "temperature", "k")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    _one_line_error(knnlm("snapshot", "restore", made["name"], *args, "-q", env=env), "--replace")


def test_help_teaches_without_loading_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from knnlm.cli import cli\n"
        "for cmd in ('create', 'list', 'restore'):\n"
        "    out = CliRunner().invoke(cli, ['snapshot', cmd, '--help'])\n"
        "    assert out.exit_code == 0 and 'knnlm snapshot ' + cmd in out.stdout, out.output\n"
        "out = CliRunner().invoke(cli, ['snapshot', '--help']).stdout\n"
        "assert all(c in out for c in ('create', 'list', 'restore', '--replace')), out\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False"]
