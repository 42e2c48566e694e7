"""The README's server path against a real Qdrant (``docker compose up -d``): server-mode
ingest and eval, then ``knnlm push`` of an embedded collection with the same perplexity.

Runs only when ``QDRANT_URL`` is set (and ``QDRANT_API_KEY`` for a secured server); there is
no Qdrant server or Docker engine on the machines that build knnlm, so CI skips it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.test_cli import Knnlm, _json_ok

URL = os.environ.get("QDRANT_URL")
pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(URL is None, reason="set QDRANT_URL to run against a Qdrant server"),
]


def _server_args() -> list[str]:
    assert URL is not None
    return ["--backend", "qdrant", "--url", URL, "--timeout", "60"]


@pytest.fixture
def knnlm(tmp_path: Path, tiny_models: dict[str, Path]) -> Knnlm:
    return Knnlm(tmp_path, tiny_models["llama"])


def test_server_ingest_eval_and_push(knnlm: Knnlm, corpus_dir: Path, tmp_path: Path) -> None:
    env = {"KNNLM_API_KEY": os.environ["QDRANT_API_KEY"]} if "QDRANT_API_KEY" in os.environ else {}
    name = f"knnlm-flow-{uuid.uuid4().hex[:8]}"
    held = tmp_path / "held.txt"
    held.write_text("def add(a, b):\n    return a + b\n")
    server = [*_server_args(), "--collection", name]
    try:
        ingest = knnlm("ingest", str(corpus_dir), *knnlm.model_args(), *server, "-q", env=env)
        assert ingest.exit_code == 0, ingest.output
        served = _json_ok(
            knnlm(
                "eval", str(held), *knnlm.model_args(), *server, "--exact", "--json", "-q", env=env
            )
        )
        assert knnlm.ingest(str(corpus_dir), "-q").exit_code == 0  # the embedded twin
        local = _json_ok(knnlm.eval(str(held), "--exact", "--json", "-q"))
        assert served["knn_perplexity"] == pytest.approx(local["knn_perplexity"], rel=1e-4)

        pushed = knnlm(
            "push",
            *knnlm.store_args(),
            "--to-url",
            URL,
            "--to-collection",
            f"{name}-pushed",
            "-q",
            env={"KNNLM_TO_API_KEY": env.get("KNNLM_API_KEY", ""), **env} if env else None,
        )
        assert pushed.exit_code == 0, pushed.output
        after = _json_ok(
            knnlm(
                "eval",
                str(held),
                *knnlm.model_args(),
                *_server_args(),
                "--collection",
                f"{name}-pushed",
                "--exact",
                "--json",
                "-q",
                env=env,
            )
        )
        assert after["knn_perplexity"] == pytest.approx(local["knn_perplexity"], rel=1e-5)
        info = json.loads(
            knnlm(
                "info", *_server_args(), "--collection", f"{name}-pushed", "--json", env=env
            ).stdout
        )
        assert info["points"] == _json_ok(knnlm.info("--json"))["points"]
    finally:
        from qdrant_client import QdrantClient

        client = QdrantClient(url=URL, api_key=os.environ.get("QDRANT_API_KEY"))
        for collection in (name, f"{name}-pushed"):
            if client.collection_exists(collection):
                client.delete_collection(collection)
        client.close()
