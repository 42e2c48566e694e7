"""knn_store: the query side of knnlm.

Start with ``open_session(KnnlmSettings(...))``: it opens a collection with the model that
built it and its tuned policy. Underneath: store backends (``knn_store.store``), the kNN
distribution (``knn``), lambda policies (``lambdas``), the retrieval gate (``gate``), the LM
wrapper (``lm``) and the scoring pipeline that composes them (``knn_lm``). Heavy libraries
(torch, transformers) load on first use.
"""

from knn_store.errors import (
    CollectionMissing,
    ConfigError,
    CorpusError,
    DimensionMismatch,
    KnnlmError,
    StoreAccessDenied,
    StoreDamaged,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    UnknownDomain,
)
from knn_store.settings import KnnlmSettings
from knn_store.store import (
    CollectionMeta,
    KnnStore,
    Neighbours,
    PointBatch,
    PointFilter,
    SearchOptions,
    StorageConfig,
    open_store,
)
from knn_store.windows import Window, pack_windows, sliding_windows

__all__ = [
    "CollectionMeta",
    "CollectionMissing",
    "ConfigError",
    "CorpusError",
    "DimensionMismatch",
    "EvalResult",
    "KnnLM",
    "KnnStore",
    "KnnlmError",
    "KnnlmSettings",
    "LanguageModel",
    "Neighbours",
    "PointBatch",
    "PointFilter",
    "SearchOptions",
    "Session",
    "StorageConfig",
    "StoreAccessDenied",
    "StoreDamaged",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "UnknownDomain",
    "Window",
    "load_language_model",
    "open_session",
    "open_store",
    "pack_windows",
    "sliding_windows",
]

_LAZY = {
    "KnnLM": "knn_store.knn_lm",
    "EvalResult": "knn_store.results",
    "LanguageModel": "knn_store.lm",
    "load_language_model": "knn_store.lm",
    "Session": "knn_store.session",
    "open_session": "knn_store.session",
}


def __getattr__(name: str) -> object:
    # torch-backed names import lazily, so `knnlm --help` stays instant.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'knn_store' has no attribute {name!r}")
