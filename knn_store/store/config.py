"""How a collection stores its keys (fixed at creation) and how a search reads them.

``StorageConfig`` is recorded with the collection and honoured by both engines; changing it
means copying the points into a new collection (``knnlm rebuild``), never running the LM
again. ``SearchOptions`` may change from one query to the next.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from knn_store.errors import ConfigError

DATATYPES = ("float32", "float16")
# TurboQuant bit widths offered by Qdrant; "turbo4" is 4 bits per dimension.
TURBO_BITS = {"turbo1": "1", "turbo1.5": "1.5", "turbo2": "2", "turbo4": "4", "turbo8": "8"}
QUANTIZATIONS = ("none", "int8", "binary", *TURBO_BITS)


@dataclass(frozen=True)
class StorageConfig:
    """Storage of one collection's keys. Every field has a ``KnnlmSettings`` twin.

    datatype: ``float32`` or ``float16`` for the original vectors.
    quantization: a compressed copy searched first (``int8`` scalar, ``binary``, TurboQuant
        ``turbo1`` .. ``turbo8``), kept in RAM; the originals rescore the candidates.
    vectors_on_disk: keep the original vectors on disk (memory-mapped) instead of in RAM.
    index_on_disk: keep the HNSW graph on disk instead of in RAM.
    hnsw_m, hnsw_ef_construct: HNSW graph degree and build-time beam width.
    indexing_threshold_kb: segments larger than this get an HNSW index, and smaller ones
        are searched by a full scan. None: Qdrant's default (10 MB).
    shard_number, replication_factor, write_consistency_factor: Qdrant cluster layout
        (server collections only): shards, copies of each, and the copies that must
        acknowledge a write.
    """

    datatype: str = "float32"
    quantization: str = "none"
    vectors_on_disk: bool = False
    index_on_disk: bool = False
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    indexing_threshold_kb: int | None = None
    shard_number: int | None = None
    replication_factor: int | None = None
    write_consistency_factor: int | None = None

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ConfigError(f"vector datatype must be one of {DATATYPES}, got {self.datatype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        for name in ("hnsw_m", "hnsw_ef_construct"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        cluster = ("shard_number", "replication_factor", "write_consistency_factor")
        for name in ("indexing_threshold_kb", *cluster):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if (self.write_consistency_factor or 1) > (self.replication_factor or 1):
            raise ConfigError(
                f"write_consistency_factor ({self.write_consistency_factor}) must not exceed "
                f"replication_factor ({self.replication_factor or 1})"
            )

    @property
    def clustered(self) -> bool:
        """True when a cluster layout is asked for (only a server can give it)."""
        return bool(self.shard_number or self.replication_factor or self.write_consistency_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StorageConfig:
        """Read a stored record; fields it lacks (older collections) take the defaults,
        which are what those collections were created with."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def differences(self, engine: dict[str, Any]) -> list[str]:
        """Where the engine's own settings (``KnnStore.engine_storage``) differ from this
        record, one phrase each; an unset layout or threshold takes the engine's default."""
        defaults = {"shard_number": 1, "replication_factor": 1, "write_consistency_factor": 1}
        out = []
        for name, recorded in self.to_dict().items():
            if name not in engine:
                continue
            if recorded is None:
                if name not in defaults:
                    continue
                recorded = defaults[name]
            if engine[name] != recorded:
                out.append(f"{name} is {engine[name]!r} on the server, {recorded!r} in the record")
        return out

    def describe(self) -> str:
        """One line for ``knnlm info``."""
        parts = [self.datatype, "vectors on disk" if self.vectors_on_disk else "vectors in RAM"]
        if self.quantization != "none":
            parts.append(f"{self.quantization} quantized (in RAM)")
        index = "on disk" if self.index_on_disk else "in RAM"
        parts.append(f"HNSW m={self.hnsw_m} ef_construct={self.hnsw_ef_construct} {index}")
        if self.indexing_threshold_kb is not None:
            parts.append(f"indexed past {self.indexing_threshold_kb} KB")
        if self.clustered:
            layout = f"{self.shard_number or 1} shards x {self.replication_factor or 1} replicas"
            if self.write_consistency_factor:
                layout += f", writes acknowledged by {self.write_consistency_factor}"
            parts.append(layout)
        return ", ".join(parts)


@dataclass(frozen=True)
class SearchOptions:
    """How one search reads the collection.

    exact: full scan over the original keys instead of HNSW (quantization ignored).
    hnsw_ef: HNSW beam width; None: k (at 1M kernel-docs keys, 2k raised recall from 0.98
        to 0.995 but left the kNN-LM's perplexity as it was). Never below k.
    rescore: re-rank quantized candidates with the original vectors (exact distances).
    oversampling: candidates fetched per wanted neighbour before rescoring (>= 1).
    """

    exact: bool = False
    hnsw_ef: int | None = None
    rescore: bool = False
    oversampling: float | None = None

    def __post_init__(self) -> None:
        if self.hnsw_ef is not None and self.hnsw_ef < 1:
            raise ConfigError(f"hnsw_ef must be positive, got {self.hnsw_ef}")
        if self.oversampling is not None and not 1.0 <= self.oversampling <= 100.0:
            raise ConfigError(f"oversampling must lie in [1, 100], got {self.oversampling}")

    def ef(self, k: int) -> int:
        return max(self.hnsw_ef if self.hnsw_ef is not None else k, k)

    def rescores(self, storage: StorageConfig) -> bool:
        """Binary codes always rescore: their scores are not Euclidean distances (at 1M
        kernel-docs keys, unrescored binary search gave recall 0.001 and +33% perplexity)."""
        return self.rescore or storage.quantization == "binary"

    def describe(self, k: int, storage: StorageConfig | None = None) -> str:
        text = "exact" if self.exact else f"hnsw ef={self.ef(k)}"
        if storage is not None and storage.quantization != "none":
            text += f", {storage.quantization}"
            rescored = self.rescores(storage)
            text += f", rescored x{self.oversampling or 1:g}" if rescored else ", not rescored"
        return text


@dataclass(frozen=True)
class StoreLocation:
    """Where a collection lives and how to reach it: what ``open_store`` needs, and no
    more (``KnnlmSettings.store_location()`` makes one from the settings).

    backend: ``edge`` (embedded), ``qdrant`` (a server at ``url``) or ``local``
        (qdrant-client's local mode, for tests).
    data_dir: the folder of embedded and local-mode collections.
    The rest reach a server: its key, transport (REST, or gRPC on ``grpc_port``), the CA to
    trust for https, the request timeout, retries of calls that got no answer, and
    concurrent search requests.
    """

    collection: str
    backend: str = "edge"
    data_dir: Path = Path(".")
    url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    prefer_grpc: bool = False
    grpc_port: int = 6334
    ca_cert: Path | None = None
    timeout: int = 60
    retries: int = 3
    search_threads: int | None = None
    allow_insecure_api_key: bool = False
