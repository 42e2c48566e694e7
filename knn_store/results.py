"""What scoring texts gives: per token (``TokenScores``), summed over texts
(``EvalResult``), with their perplexities defined once (``Perplexities``), and why each
token was predicted (``TokenExplanation``). Plain data, light to import: the service's
response schemas are these."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def perplexity(nll: float, tokens: int) -> float:
    """exp(nll / tokens): inf where the mean NLL is infinite or past float range."""
    mean = nll / tokens
    return math.exp(mean) if mean < 709.0 else math.inf


class Perplexities:
    """Perplexities from ``tokens`` and the summed NLLs (nats) ``base_nll`` and ``knn_nll``
    of the LM alone and of the kNN-LM."""

    tokens: int
    base_nll: float
    knn_nll: float

    @property
    def base_perplexity(self) -> float:
        return perplexity(self.base_nll, self.tokens)

    @property
    def knn_perplexity(self) -> float:
        return perplexity(self.knn_nll, self.tokens)

    @property
    def change_percent(self) -> float:
        """How much the kNN-LM changes the perplexity, in percent (negative: better)."""
        return 100 * math.expm1((self.knn_nll - self.base_nll) / self.tokens)


@dataclass(frozen=True)
class EvalResult(Perplexities):
    """Perplexity, top-1 accuracy and costs of the LM alone and of the kNN-LM over texts
    (``KnnLM.evaluate``, ``knnlm eval``)."""

    tokens: int
    base_nll: float  # summed over tokens, nats
    knn_nll: float
    lm_seconds: float
    search_seconds: float
    queries: int  # positions actually searched (the gate may skip some)
    zero_prob_tokens: int  # tokens the kNN-LM gave probability 0 (lambda 1, no neighbour)
    followed: int | None = None  # positions scored from followed pointers (None: off)
    base_correct: int = 0  # positions where the LM's argmax is the token that came
    knn_correct: int = 0  # ... and the kNN-LM's argmax

    @property
    def base_top1(self) -> float:
        """Top-1 next-token accuracy of the LM alone."""
        return self.base_correct / self.tokens if self.tokens else 0.0

    @property
    def knn_top1(self) -> float:
        """Top-1 next-token accuracy of the kNN-LM (its whole mixed distribution)."""
        return self.knn_correct / self.tokens if self.tokens else 0.0

    @property
    def search_ms_per_query(self) -> float:
        return 1000 * self.search_seconds / self.queries if self.queries else 0.0

    @property
    def skipped_share(self) -> float:
        return 1 - self.queries / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "base_perplexity": self.base_perplexity,
            "knn_perplexity": self.knn_perplexity,
            "change_percent": self.change_percent,
            "base_top1": self.base_top1,
            "knn_top1": self.knn_top1,
            "lm_seconds": self.lm_seconds,
            "search_seconds": self.search_seconds,
            "searches": self.queries,
            "skipped_share": self.skipped_share,
            "search_ms_per_query": self.search_ms_per_query,
            "zero_probability_tokens": self.zero_prob_tokens,
            **({} if self.followed is None else {"followed_pointers": self.followed}),
        }


@dataclass(frozen=True)
class TokenScores(Perplexities):
    """One text scored: per predicted token, in order (arrays of length ``tokens``)."""

    targets: np.ndarray  # int64, the token that came next
    base_log_probs: np.ndarray  # float32, log p_LM(target)
    knn_log_probs: np.ndarray  # float32, the kNN-LM's log p(target); -inf where it gave 0
    lambdas: np.ndarray  # float32
    searched: np.ndarray  # bool, False where the retrieval gate skipped the search

    @property  # type: ignore[override]
    def tokens(self) -> int:
        return len(self.targets)

    @property  # type: ignore[override]
    def base_nll(self) -> float:
        return -float(np.sum(self.base_log_probs, dtype=np.float64))

    @property  # type: ignore[override]
    def knn_nll(self) -> float:
        return -float(np.sum(self.knn_log_probs, dtype=np.float64))


@dataclass(frozen=True)
class Neighbour:
    """A stored point near the query, with what ingest kept of where it came from."""

    sq_distance: float
    token: str  # the value: the token that followed the stored context
    domain: str | None
    source: str | None
    offset: int | None  # token position in its document
    context: str | None  # text just before the value, as stored at ingest


@dataclass(frozen=True)
class TokenExplanation:
    """Why the kNN-LM predicted one token (``explain``; a line of `knnlm explain --json`,
    a row of ``/v1/explain``)."""

    position: int  # position of the predicted token in the text (BOS = 0)
    token: str  # the token that actually came next
    prob: float  # kNN-LM probability of it
    lm_prob: float
    knn_prob: float
    lmbda: float
    searched: bool  # False where the retrieval gate skipped the search, or pointers served
    lm_top: list[tuple[str, float]]
    knn_top: list[tuple[str, float]]
    neighbours: list[Neighbour]  # with ``followed``, the successors followed, not a search's
    # scored from the pointers the last token left (RetoMaton), without a search
    followed: bool = False
    # the document cache's p(token) and its weight in ``prob`` (None / 0: cache off, or
    # nothing earlier in the text)
    cache_prob: float | None = None
    cache_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
