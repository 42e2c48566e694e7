"""Sliding-window perplexity of the base LM and of the kNN-LM, from one pass.

Per batch of windows: one LM forward gives both the log-probabilities and the keys, then one
batched search covers every scored position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from knn_store.knn_lm import KnnLM, lm_summary
from knn_store.lambdas import QueryFeatures
from knn_store.lm import LanguageModel
from knn_store.windows import Window, pack_windows, sliding_windows


@dataclass(frozen=True)
class EvalResult:
    tokens: int
    base_nll: float  # summed over tokens, nats
    knn_nll: float
    lm_seconds: float
    search_seconds: float
    queries: int

    @property
    def base_perplexity(self) -> float:
        return math.exp(self.base_nll / self.tokens)

    @property
    def knn_perplexity(self) -> float:
        return math.exp(self.knn_nll / self.tokens)

    @property
    def search_ms_per_query(self) -> float:
        return 1000 * self.search_seconds / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "base_perplexity": self.base_perplexity,
            "knn_perplexity": self.knn_perplexity,
            "change_percent": 100 * (self.knn_perplexity / self.base_perplexity - 1),
            "lm_seconds": self.lm_seconds,
            "search_seconds": self.search_seconds,
            "search_ms_per_query": self.search_ms_per_query,
        }


def evaluate(
    lm: LanguageModel,
    knn_lm: KnnLM,
    sequences: Sequence[np.ndarray],
    *,
    window: int,
    stride: int,
    batch_size: int = 1,
    progress: bool = False,
) -> EvalResult:
    """Perplexity of ``lm`` alone and interpolated with ``knn_lm`` over token ``sequences``.

    Args:
        sequences: int64 [n_i] token ids per document, BOS prefix included (``lm.encode``).
        window, stride: sliding windows (``knn_store.windows``).
        batch_size: windows per LM forward.
    """
    base_nll = knn_nll = 0.0
    lm_seconds = 0.0
    search_before, queries_before = knn_lm.search_seconds, knn_lm.queries
    for scored, features, seconds in retrieved_batches(
        lm,
        knn_lm,
        sequences,
        window=window,
        stride=stride,
        batch_size=batch_size,
        progress=progress,
        desc="eval",
    ):
        lm_seconds += seconds
        knn_lp = knn_lm.target_log_probs(scored.lm_target_log_probs, features, scored.targets)
        base_nll -= scored.lm_target_log_probs.double().sum().item()
        knn_nll -= knn_lp.double().sum().item()
    total = knn_lm.queries - queries_before
    return EvalResult(
        tokens=total,
        base_nll=base_nll,
        knn_nll=knn_nll,
        lm_seconds=lm_seconds,
        search_seconds=knn_lm.search_seconds - search_before,
        queries=knn_lm.queries - queries_before,
    )


@dataclass(frozen=True)
class ScoredPositions:
    """The LM's view of every scored position in a batch of windows; ``m`` positions."""

    keys: torch.Tensor  # float32 [m, dim]
    targets: torch.Tensor  # int64 [m], the true next tokens
    lm_target_log_probs: torch.Tensor  # float32 [m]
    lm_entropy: torch.Tensor  # float32 [m]
    lm_max_log_prob: torch.Tensor  # float32 [m]


def retrieved_batches(
    lm: LanguageModel,
    knn_lm: KnnLM,
    sequences: Sequence[np.ndarray],
    *,
    window: int,
    stride: int,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "eval",
    with_cosine: bool | None = None,
) -> Iterator[tuple[ScoredPositions, QueryFeatures, float]]:
    """Per batch of windows: the LM's view of each scored position, what the lambda policy
    sees there, and the seconds the LM took. A progress bar counts tokens."""
    jobs = [
        (seq, w)
        for seq in sequences
        for w in sliding_windows(len(seq), window=window, stride=stride)
    ]
    total = sum(len(w.positions) for _, w in jobs)
    if total == 0:
        raise ValueError("nothing to evaluate: every sequence is shorter than 2 tokens")
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not progress) as bar:
        for lo in range(0, len(jobs), batch_size):
            started = time.perf_counter()
            scored = score_windows(lm, jobs[lo : lo + batch_size])
            seconds = time.perf_counter() - started
            features = knn_lm.features(
                knn_lm.neighbours(scored.keys, with_cosine=with_cosine),
                lm_entropy=scored.lm_entropy,
                lm_max_log_prob=scored.lm_max_log_prob,
            )
            yield scored, features, seconds
            bar.update(len(scored.targets))


def score_windows(lm: LanguageModel, group: list[tuple[np.ndarray, Window]]) -> ScoredPositions:
    """One LM forward over a batch of windows, reduced to what eval and tuning need."""
    input_ids, mask = pack_windows(group, pad_id=lm.pad_id)  # [b, W] each
    rows, cols, targets = [], [], []
    for row, (seq, win) in enumerate(group):
        positions = win.positions  # [m_i]
        rows.append(np.full(len(positions), row))
        cols.append(positions - win.start)
        targets.append(seq[positions + 1])
    out = lm.forward(input_ids, attention_mask=mask, with_logits=True)
    assert out.logits is not None
    r = torch.from_numpy(np.concatenate(rows)).to(out.keys.device)  # [m]
    c = torch.from_numpy(np.concatenate(cols)).to(out.keys.device)  # [m]
    t = torch.from_numpy(np.concatenate(targets)).to(out.keys.device)  # [m]
    log_probs = torch.log_softmax(out.logits[r, c].float(), dim=-1)  # [m, V], scored rows only
    entropy, max_log_prob = lm_summary(log_probs)
    return ScoredPositions(
        keys=out.keys[r, c],
        targets=t,
        lm_target_log_probs=log_probs.gather(1, t[:, None]).squeeze(1),
        lm_entropy=entropy,
        lm_max_log_prob=max_log_prob,
    )
