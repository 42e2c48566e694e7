"""``GET /version``: which knnlm, model, collection and engine answer, for bug reports and
for checking a deployment. Only versions and names: no location, URL, key or setting."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from knn_store.errors import KnnlmError
from knnlm.service.schemas import error_responses

if TYPE_CHECKING:
    from knn_store.session import Session

ENGINES = {"edge": "Qdrant Edge", "local": "qdrant-client local mode", "qdrant": "Qdrant server"}


class Version(BaseModel):
    """The versions behind the answers."""

    knnlm: str
    model: str = Field(description="The model's name, as completions report it.")
    model_fingerprint: str | None = Field(
        description="The hash of the weights the collection was built with (the model's)."
    )
    collection: str
    backend: str = Field(description="edge, local or qdrant (--backend).")
    engine: str = Field(description="Qdrant Edge, qdrant-client local mode or Qdrant server.")
    engine_version: str | None = Field(
        description="The engine's version; null when a Qdrant server does not answer."
    )
    qdrant_client: str
    qdrant_edge: str | None = Field(description="qdrant-edge-py's version, when installed.")
    torch: str
    transformers: str
    python: str
    device: str = Field(description="Where the model runs: cpu, cuda:0, ...")


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def install_version(app: FastAPI, session: Session) -> None:
    """Serve ``GET /version`` for ``session``. The package versions are read once, here; a
    Qdrant server's version is asked at the first request (the store keeps it)."""
    import torch
    import transformers

    backend = session.settings.backend
    meta = session.store.meta
    fixed = {
        "knnlm": _installed("knnlm") or "unknown",
        "model": session.lm.name,
        "model_fingerprint": None if meta is None else meta.model_fingerprint,
        "collection": session.store.name,
        "backend": backend,
        "engine": ENGINES.get(backend, backend),
        "qdrant_client": _installed("qdrant-client") or "unknown",
        "qdrant_edge": _installed("qdrant-edge-py"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(session.lm.device),
    }

    def engine_version() -> str | None:
        if backend == "edge":
            return fixed["qdrant_edge"]
        if backend == "local":
            return fixed["qdrant_client"]
        try:
            return session.store.server_version
        except KnnlmError:  # a server that does not answer now: say so, do not fail
            return None

    @app.get("/version", response_model=Version, responses=error_responses(401))
    async def version_() -> Version:
        """knnlm, model, collection, engine, torch and transformers versions."""
        return Version(**fixed, engine_version=await run_in_threadpool(engine_version))
