"""What the tests of the service, the OpenAI client, the page and the limits run against: a
real uvicorn server over an app, in a thread, on a free loopback port; and the small
collection they serve, ingested by the CLI (``tiny_collection``)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UvicornThread:
    """``with UvicornThread(app) as served:`` serves ``app`` at ``served.url`` until the
    block ends, then stops the server (its lifespan closes the app's batcher) and checks
    that its thread ended. ``shutdown_timeout`` runs `knnlm serve`'s own server class, with
    its shutdown deadline."""

    def __init__(
        self, app: Any, *, log_level: str = "warning", shutdown_timeout: float | None = None
    ) -> None:
        import uvicorn

        from knnlm.service.http_protocol import protocol_class

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if shutdown_timeout is None:
            config = uvicorn.Config(
                app, log_config=None, log_level=log_level, http=protocol_class()
            )
            self.server = uvicorn.Server(config)
        else:
            from knnlm.serve import _GRACE_SHARE, _server_class

            config = uvicorn.Config(
                app,
                log_config=None,
                log_level=log_level,
                http=protocol_class(),
                timeout_graceful_shutdown=shutdown_timeout * _GRACE_SHARE,
            )
            self.server = _server_class()(
                config, batcher=app.state.batcher, shutdown_timeout=shutdown_timeout
            )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive()

    def connect(self) -> socket.socket:
        """A raw connection to the server, for what an HTTP client would not send."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)


@dataclass(frozen=True)
class TinyCollection:
    """A collection of the test corpus, ingested by ``knnlm ingest`` as a user would."""

    root: Path
    settings: Any  # KnnlmSettings that open it (top_k 8)
    model_flags: list[str]  # --model, --window, --stride
    store_flags: list[str]  # --data-dir, --collection, --backend

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def cli(self, args: list[str]) -> list[Any]:
        """A ``knnlm`` command's JSON lines, run with this collection's model cache."""
        return run_cli(args, self.cache)


def run_cli(args: list[str], cache: Path) -> list[Any]:
    """The JSON lines a ``knnlm`` command prints; it must exit 0."""
    from click.testing import CliRunner

    from knnlm.cli import cli

    result = CliRunner().invoke(cli, args, env={"KNNLM_MODEL_CACHE": str(cache)})
    assert result.exit_code == 0, (result.output, result.exception)
    return [json.loads(line) for line in result.stdout.splitlines()]


@contextmanager
def clean_environment() -> Iterator[None]:
    """No KNNLM_* variable from the developer's shell, for fixtures wider than a test
    (conftest's cleaning is per test)."""
    import pytest

    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.upper().startswith("KNNLM_"):
                env.delenv(name)
        yield


def tiny_collection(
    root: Path,
    model: Path,
    *,
    collection: str = "test",
    backend: str = "edge",
    window: int = 16,
    stride: int = 8,
    ingest: tuple[str, ...] = (),
) -> TinyCollection:
    """The test corpus (``CORPUS_LINES``, three times each, one file a line) under ``root``,
    ingested into ``collection`` with ``model``; call it within ``clean_environment``."""
    from knn_store import KnnlmSettings
    from tests.conftest import CORPUS_LINES
    from tests.files import write

    for i, line in enumerate(CORPUS_LINES):
        write(root / "corpus" / f"doc{i}.txt", line * 3)
    model_flags = ["--model", str(model), "--window", str(window), "--stride", str(stride)]
    store_flags = ["--data-dir", str(root / "data"), "--collection", collection]
    store_flags += ["--backend", backend]
    made = TinyCollection(
        root,
        KnnlmSettings(
            model=str(model),
            window=window,
            stride=stride,
            data_dir=root / "data",
            collection=collection,
            backend=backend,
            model_cache=root / "cache",
            top_k=8,
        ),
        model_flags,
        store_flags,
    )
    made.cli(["ingest", str(root / "corpus"), *model_flags, *store_flags, *ingest, "-q", "--json"])
    return made
