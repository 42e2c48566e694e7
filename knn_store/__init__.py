"""knn_store: the query side of knnlm.

Store backends (``knn_store.store``), the kNN distribution (``knn``), lambda policies
(``lambdas``), the LM wrapper (``lm``), their composition (``knn_lm``) and perplexity
evaluation (``perplexity``). Heavy libraries (torch, transformers) load on first use.
"""

from knn_store.errors import (
    CollectionMissing,
    ConfigError,
    CorpusError,
    DimensionMismatch,
    KnnlmError,
    StoreError,
    StoreUnavailable,
)
from knn_store.settings import KnnlmSettings
from knn_store.store import CollectionMeta, KnnStore, Neighbours, PointBatch, open_store
from knn_store.windows import Window, pack_windows, sliding_windows

__all__ = [
    "CollectionMeta",
    "CollectionMissing",
    "ConfigError",
    "CorpusError",
    "DimensionMismatch",
    "KnnLM",
    "KnnStore",
    "KnnlmError",
    "KnnlmSettings",
    "LanguageModel",
    "Neighbours",
    "PointBatch",
    "StoreError",
    "StoreUnavailable",
    "Window",
    "evaluate",
    "load_language_model",
    "open_store",
    "pack_windows",
    "sliding_windows",
]


def __getattr__(name: str) -> object:
    # torch-backed names import lazily, so `knnlm --help` stays instant.
    if name == "KnnLM":
        from knn_store.knn_lm import KnnLM

        return KnnLM
    if name in ("LanguageModel", "load_language_model"):
        from knn_store import lm

        return getattr(lm, name)
    if name == "evaluate":
        from knn_store.perplexity import evaluate

        return evaluate
    raise AttributeError(f"module 'knn_store' has no attribute {name!r}")
