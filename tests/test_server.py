"""knnlm against a real Qdrant server, over REST and over gRPC.

The server comes from the ``qdrant_server`` fixture (``QDRANT_URL``, or a ``qdrant`` process
started here in strict mode, as on Qdrant Cloud); without one these tests skip and say why.
They cover what local mode cannot show: every storage setting reaching the server and read
back, the same numbers as Edge and local mode, the CLI's collection commands, the service on
a server collection, and a secured server (TLS with a private CA, an API key, a read-only
JWT).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from knn_store import CollectionMeta, ConfigError, KnnlmSettings, PointBatch
from knn_store.store.client import QdrantClientStore
from knn_store.store.config import SearchOptions, StorageConfig
from knn_store.store.point_ids import document_hash, make_point_ids
from tests.qdrant_server import QdrantNode, Server, Tls, jwt_token
from tests.reference import brute_force_knn
from tests.test_cli import Knnlm, _json_ok, _one_line_error

pytestmark = pytest.mark.server

DIM, N, VOCAB = 16, 400, 50
META = CollectionMeta(
    model="tiny",
    model_fingerprint="abc",
    key_type="final",
    dim=DIM,
    vocab_size=VOCAB,
    tokenizer="t",
)
HELD = "def add(a, b):\n    return a + b\nclass Stack:\n    def push(self, x):\n"


@pytest.fixture(params=["rest", "grpc"])
def grpc(request: pytest.FixtureRequest) -> bool:
    return request.param == "grpc"


def _name(prefix: str = "knnlm-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _store(server: Server, name: str, *, grpc: bool = False, create: bool = True):
    return QdrantClientStore.server(
        server.url,
        collection=name,
        api_key=server.api_key,
        prefer_grpc=grpc,
        grpc_port=server.grpc_port,
        ca_cert=server.ca_cert,
        create=create,
        retries=1,
    )


def _points(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, PointBatch]:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DIM)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, n)
    ids = make_point_ids(document_hash("d", "t"), np.arange(n), tokens)
    payloads = [{"domain": "a" if i % 3 else "b", "doc": "d0", "offset": i} for i in range(n)]
    return keys, tokens, PointBatch(ids=ids, keys=keys, payloads=payloads)


# --- storage settings ------------------------------------------------------------------------

STORAGES = [
    StorageConfig(),
    StorageConfig(datatype="float16", quantization="int8", vectors_on_disk=True),
    StorageConfig(quantization="binary", index_on_disk=True, hnsw_m=8, hnsw_ef_construct=32),
    StorageConfig(quantization="turbo1", datatype="float16"),
    StorageConfig(quantization="turbo1.5"),
    StorageConfig(quantization="turbo2", indexing_threshold_kb=100),
    # the default: float16 keys on disk, turbo4 in RAM; and a cluster layout on one node
    StorageConfig(
        datatype="float16",
        quantization="turbo4",
        vectors_on_disk=True,
        shard_number=3,
        replication_factor=1,
        write_consistency_factor=1,
    ),
]


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: s.describe())
def test_every_storage_setting_reaches_the_server(
    qdrant_server: Server, storage: StorageConfig, grpc: bool
) -> None:
    keys, tokens, batch = _points()
    store = _store(qdrant_server, _name(), grpc=grpc)
    try:
        store.ensure_collection(dataclasses.replace(META, storage=storage))
        store.upsert(batch)
        store.finalize()
        engine = store.engine_storage()
        assert engine is not None
        assert storage.differences(engine) == [], engine  # the server holds what was asked
        assert engine["hnsw_m"] == storage.hnsw_m  # HNSW switched on after the bulk load
        queries = keys[:10] + 0.01
        got = store.search(queries, k=5, options=SearchOptions(rescore=True, oversampling=4.0))
        idx, _ = brute_force_knn(keys, queries, 5)
        assert (got.token_ids[:, 0] == tokens[idx[:, 0]]).all()
        exact = store.search(queries, k=5, options=SearchOptions(exact=True))
        np.testing.assert_array_equal(exact.token_ids, tokens[idx])
    finally:
        store.drop()
        store.close()


def test_info_reads_the_settings_back_from_the_server(
    qdrant_server: Server, tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    name = _name()
    flags = [*qdrant_server.cli_args(), "--collection", name]
    layout = ["--quantization", "int8", "--no-vectors-on-disk", "--hnsw-m", "12"]
    layout += ["--hnsw-ef-construct", "40", "--index-on-disk", "--shard-number", "2"]
    layout += ["--replication-factor", "1", "--write-consistency-factor", "1"]
    env = qdrant_server.env()
    try:
        ingest = knnlm(
            "ingest", str(corpus_dir), *knnlm.model_args(), *flags, *layout, "-q", env=env
        )
        assert ingest.exit_code == 0, ingest.output
        info = _json_ok(knnlm("info", *flags, "--json", env=env))
        assert info["server_version"] and info["server_version"][0].isdigit()
        assert info["engine_storage"] == {
            "datatype": "float16",
            "quantization": "int8",
            "vectors_on_disk": False,
            "index_on_disk": True,
            "hnsw_m": 12,
            "hnsw_ef_construct": 40,
            "indexing_threshold_kb": info["engine_storage"]["indexing_threshold_kb"],
            "shard_number": 2,
            "replication_factor": 1,
            "write_consistency_factor": 1,
        }
        text = knnlm("info", *flags, env=env).stdout
        assert any(
            line.split()[:2] == ["server_version", info["server_version"]]
            for line in text.splitlines()
        ), text
        assert knnlm("check", *flags, "-q", env=env).exit_code == 0
    finally:
        qdrant_server.drop_collections(name)


def test_a_quantization_the_server_lacks_is_one_line_naming_its_version(
    qdrant_server: Server,
) -> None:
    """TurboQuant 8-bit came after Qdrant 1.18: such a server refuses it by name."""
    store = _store(qdrant_server, _name())
    version = store.server_version
    assert version is not None
    try:
        store.ensure_collection(
            dataclasses.replace(META, storage=StorageConfig(quantization="turbo8"))
        )
    except ConfigError as exc:
        message = str(exc)
        assert f"Qdrant {version}" in message and "turbo8" in message
        assert "\n" not in message
        assert not store._client.collection_exists(store.name)  # nothing left behind
    else:  # a newer server has it: then it must hold it
        engine = store.engine_storage()
        assert engine is not None and engine["quantization"] == "turbo8"
        store.drop()
    finally:
        store.close()


def test_write_consistency_cannot_exceed_replication() -> None:
    with pytest.raises(ConfigError, match="write_consistency_factor"):
        StorageConfig(replication_factor=2, write_consistency_factor=3)


# --- the same numbers on every engine --------------------------------------------------------


def test_edge_local_and_server_agree(
    qdrant_server: Server, tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:
    """The congruence check: one corpus into Edge, local mode and the server (read over REST
    and gRPC): the same exact neighbours and the same perplexities."""
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    held = tmp_path / "held.txt"
    held.write_text(HELD)
    name = _name()
    server = [*qdrant_server.cli_args(), "--collection", name]
    env = qdrant_server.env()
    common = ["--exact", "--json", "-q"]
    exact_f32 = ["--vector-datatype", "float32", "--quantization", "none"]
    try:
        results: dict[str, dict[str, Any]] = {}
        for backend, flags in [
            ("edge", knnlm.store_args()),
            ("local", [*knnlm.store_args(), "--backend", "local"]),
            ("server", server),
        ]:
            ingest = knnlm(
                "ingest", str(corpus_dir), *knnlm.model_args(), *flags, *exact_f32, "-q", env=env
            )
            assert ingest.exit_code == 0, ingest.output
            results[backend] = _json_ok(
                knnlm("eval", str(held), *knnlm.model_args(), *flags, *common, env=env)
            )
        grpc_flags = [*qdrant_server.cli_args(grpc=True), "--collection", name]
        results["server-grpc"] = _json_ok(
            knnlm("eval", str(held), *knnlm.model_args(), *grpc_flags, *common, env=env)
        )
        reference = results["edge"]
        for backend, got in results.items():
            assert got["tokens"] == reference["tokens"], backend
            assert got["base_perplexity"] == reference["base_perplexity"], backend
            assert got["knn_perplexity"] == pytest.approx(reference["knn_perplexity"], rel=1e-5), (
                backend
            )
        assert reference["knn_perplexity"] != reference["base_perplexity"]
    finally:
        qdrant_server.drop_collections(name)


def test_neighbours_agree_with_edge_and_brute_force(
    qdrant_server: Server, tmp_path: Path, grpc: bool
) -> None:
    from knn_store.store.edge import EdgeStore

    keys, tokens, batch = _points(seed=9)
    queries = keys[:30] + 0.01
    idx, d2 = brute_force_knn(keys, queries, 25)
    results = []
    for store in (EdgeStore(tmp_path / "edge"), _store(qdrant_server, _name(), grpc=grpc)):
        try:
            store.ensure_collection(META)
            store.upsert(batch)
            store.finalize()
            results.append(store.search(queries, k=25, options=SearchOptions(exact=True)))
        finally:
            if isinstance(store, QdrantClientStore):
                store.drop()
            store.close()
    for got in results:
        np.testing.assert_array_equal(got.token_ids, tokens[idx])
        np.testing.assert_allclose(got.sq_distances, d2, rtol=1e-4, atol=1e-4)


# --- the collection commands on a server -----------------------------------------------------


def test_domains_rebuild_check_and_push_on_a_server(
    qdrant_server: Server,
    tmp_path: Path,
    tiny_models: dict[str, Path],
    corpus_dir: Path,
    grpc: bool,
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    env = qdrant_server.env()
    name = _name()
    server = [*qdrant_server.cli_args(grpc=grpc), "--collection", name]
    model = knnlm.model_args()
    held = tmp_path / "held.txt"
    held.write_text(HELD)
    try:
        a = knnlm("ingest", str(corpus_dir), *model, *server, "--domain", "a", "-q", env=env)
        assert a.exit_code == 0, a.output
        b = knnlm("ingest", str(held), *model, *server, "--domain", "b", "-q", env=env)
        assert b.exit_code == 0, b.output
        again = knnlm("ingest", str(corpus_dir), *model, *server, "--domain", "a", "-q", env=env)
        assert again.exit_code == 0
        info = _json_ok(knnlm("info", *server, "--json", env=env))
        assert set(info["domains"]) == {"a", "b"}
        total = info["points"]
        assert total == sum(info["domains"].values())

        rebuilt = f"{name}-exact"
        result = knnlm(
            "rebuild", *server, "--to-collection", rebuilt, "--quantization", "none", "-q", env=env
        )
        assert result.exit_code == 0, result.output
        rebuilt_flags = [*qdrant_server.cli_args(grpc=grpc), "--collection", rebuilt]
        rebuilt_info = _json_ok(knnlm("info", *rebuilt_flags, "--json", env=env))
        assert rebuilt_info["points"] == total
        assert rebuilt_info["engine_storage"]["quantization"] == "none"
        source_eval = _json_ok(
            knnlm("eval", str(held), *model, *server, "--exact", "--json", "-q", env=env)
        )
        rebuilt_eval = _json_ok(
            knnlm("eval", str(held), *model, *rebuilt_flags, "--exact", "--json", "-q", env=env)
        )
        assert rebuilt_eval["knn_perplexity"] == pytest.approx(source_eval["knn_perplexity"])

        dropped = knnlm("domains", "drop", "b", "--yes", *server, env=env)
        assert dropped.exit_code == 0, dropped.output
        assert _json_ok(knnlm("info", *server, "--json", env=env))["domains"] == {
            "a": info["domains"]["a"]
        }
        check = knnlm("check", *server, "-q", env=env)
        assert check.exit_code == 0, check.output

        # push: an embedded twin onto the server gives the embedded numbers
        assert knnlm.ingest(str(corpus_dir), "-q").exit_code == 0
        local = _json_ok(knnlm.eval(str(held), "--exact", "--json", "-q"))
        pushed = f"{name}-pushed"
        push_env = {"KNNLM_TO_API_KEY": qdrant_server.api_key} if qdrant_server.api_key else {}
        # the target's connection flags; the source is named as embedded
        connection = qdrant_server.cli_args(grpc=grpc)[4:]  # less --backend and --url
        push = knnlm(
            "push",
            *knnlm.store_args(),
            "--backend",
            "edge",
            "--to-url",
            qdrant_server.url,
            "--to-collection",
            pushed,
            *connection,
            "-q",
            env=push_env,
        )
        assert push.exit_code == 0, push.output
        pushed_flags = [*qdrant_server.cli_args(grpc=grpc), "--collection", pushed]
        after = _json_ok(
            knnlm("eval", str(held), *model, *pushed_flags, "--exact", "--json", "-q", env=env)
        )
        assert after["knn_perplexity"] == pytest.approx(local["knn_perplexity"], rel=1e-5)
        assert knnlm("check", *pushed_flags, "-q", env=env).exit_code == 0
    finally:
        qdrant_server.drop_collections(name)


def test_serve_on_a_server_collection_answers_what_eval_says(
    qdrant_server: Server, tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    env = qdrant_server.env()
    name = _name()
    server = [*qdrant_server.cli_args(grpc=True), "--collection", name]
    held = tmp_path / "held.txt"
    held.write_text(HELD)
    model = knnlm.model_args()
    try:
        assert knnlm("ingest", str(corpus_dir), *model, *server, "-q", env=env).exit_code == 0
        expected = _json_ok(
            knnlm("eval", str(held), *model, "--top-k", "8", *server, "--json", "-q", env=env)
        )
        score, ready, collection = _ask_the_service(
            _service_settings(qdrant_server, tiny_models["gpt2"], name, tmp_path, grpc=True),
            [
                ("POST", "/v1/score", {"text": HELD}),
                ("GET", "/readyz", None),
                ("GET", "/v1/collection", None),
            ],
        )
        assert score.status_code == 200, score.text
        assert score.json()["knn_perplexity"] == pytest.approx(expected["knn_perplexity"])
        assert ready.status_code == 200
        assert collection.json()["server_version"]
    finally:
        qdrant_server.drop_collections(name)


# --- a secured server: TLS with a private CA, an API key, a read-only JWT --------------------

SECRET = "knnlm-test-key-8c1f2e"


@pytest.fixture(scope="module")
def secured(qdrant_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QdrantNode]:
    root = tmp_path_factory.mktemp("secured")
    node = QdrantNode(
        qdrant_binary,
        root / "node",
        api_key=SECRET,
        tls=Tls.make(root / "tls"),
        jwt_rbac=True,
        strict_mode=True,
    ).start()
    try:
        yield node
    finally:
        node.stop()


def test_secured_server_over_https_with_a_private_ca(
    secured: QdrantNode, tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    server = Server.of(secured)
    name = _name()
    held = tmp_path / "held.txt"
    held.write_text(HELD)
    model = knnlm.model_args()
    key = {"KNNLM_API_KEY": SECRET}
    try:
        for grpc in (False, True):
            flags = [*server.cli_args(grpc=grpc), "--collection", name]
            result = knnlm("ingest", str(corpus_dir), *model, *flags, "-q", env=key)
            assert result.exit_code == 0, result.output
            ok = _json_ok(knnlm("eval", str(held), *model, *flags, "--json", "-q", env=key))
            assert ok["knn_perplexity"] > 0

        # the CA also reaches knnlm through its environment variable
        env_ca = {**key, "KNNLM_CA_CERT": str(server.ca_cert)}
        plain = ["--backend", "qdrant", "--url", server.url, "--collection", name]
        assert _json_ok(knnlm("info", *plain, "--json", env=env_ca))["points"] > 0

        # without the CA: one line that says what to do
        refused = knnlm("info", *plain, "--retries", "0", env=key)
        line = _one_line_error(refused, "certificate")
        assert "--ca-cert" in line

        for bad in ({"KNNLM_API_KEY": "wrong-key-123"}, {}):
            flags = [*server.cli_args(), "--collection", name, "--retries", "0"]
            result = knnlm("info", *flags, env=bad)
            line = _one_line_error(result, "API key")
            assert SECRET not in result.output and "wrong-key-123" not in result.output
            assert "KNNLM_API_KEY" in line
    finally:
        server.drop_collections(name)


def test_a_read_only_key_reads_but_never_writes(
    secured: QdrantNode, tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    server = Server.of(secured)
    name = _name()
    held = tmp_path / "held.txt"
    held.write_text(HELD)
    model = knnlm.model_args()
    read_only = {"KNNLM_API_KEY": jwt_token(SECRET, {"access": "r"})}
    try:
        for grpc in (False, True):
            flags = [*server.cli_args(grpc=grpc), "--collection", name]
            if not grpc:
                made = knnlm(
                    "ingest", str(corpus_dir), *model, *flags, "-q", env={"KNNLM_API_KEY": SECRET}
                )
                assert made.exit_code == 0, made.output
            before = _json_ok(knnlm("info", *flags, "--json", env=read_only))
            evaluated = knnlm("eval", str(held), *model, *flags, "--json", "-q", env=read_only)
            assert _json_ok(evaluated)["knn_perplexity"] > 0
            explained = knnlm("explain", "-t", HELD, *model, *flags, "--json", env=read_only)
            assert explained.exit_code == 0, explained.output

            ingest = knnlm("ingest", str(held), *model, *flags, "-q", env=read_only)
            _one_line_error(ingest, "read-only")
            drop = knnlm("domains", "drop", "default", "--yes", *flags, env=read_only)
            _one_line_error(drop, "read-only")
            assert _json_ok(knnlm("info", *flags, "--json", env=read_only)) == before
    finally:
        server.drop_collections(name)


def test_the_service_runs_on_a_read_only_key(
    secured: QdrantNode, tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    server = Server.of(secured)
    name = _name()
    flags = [*server.cli_args(), "--collection", name]
    try:
        made = knnlm(
            "ingest",
            str(corpus_dir),
            *knnlm.model_args(),
            *flags,
            "-q",
            env={"KNNLM_API_KEY": SECRET},
        )
        assert made.exit_code == 0, made.output
        read_only = Server.of(secured, api_key=jwt_token(SECRET, {"access": "r"}))
        (response,) = _ask_the_service(
            _service_settings(read_only, tiny_models["gpt2"], name, tmp_path),
            [("POST", "/v1/score", {"text": HELD})],
        )
        assert response.status_code == 200, response.text
        assert json.loads(response.text)["knn_perplexity"] > 0
    finally:
        server.drop_collections(name)


def _service_settings(
    server: Server, model: Path, collection: str, tmp_path: Path, *, grpc: bool = False
) -> KnnlmSettings:
    return KnnlmSettings(
        model=str(model),
        window=16,
        stride=8,
        top_k=8,
        backend="qdrant",
        url=server.url,
        grpc_port=server.grpc_port,
        prefer_grpc=grpc,
        ca_cert=server.ca_cert,
        api_key=server.api_key,
        collection=collection,
        model_cache=tmp_path / "cache",
    )


def _ask_the_service(
    settings: KnnlmSettings, requests: list[tuple[str, str, Any]]
) -> list[httpx.Response]:
    """Open a session on ``settings``, serve it in-process, and send ``requests``."""
    from knn_store import open_session
    from knnlm.service.app import create_app

    with open_session(settings) as session:
        app = create_app(session)

        async def ask() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return [
                    await client.request(method, path, json=body) for method, path, body in requests
                ]

        try:
            return asyncio.run(ask())
        finally:
            app.state.batcher.close()
