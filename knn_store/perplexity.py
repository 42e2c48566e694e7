"""Sliding-window perplexity of the base LM and of the kNN-LM, from one pass.

Per batch of windows: one LM forward gives both the log-probabilities and the keys, then one
batched search covers every scored position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from knn_store.knn_lm import KnnLM
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
    jobs = [
        (seq, w)
        for seq in sequences
        for w in sliding_windows(len(seq), window=window, stride=stride)
    ]
    total = sum(len(w.positions) for _, w in jobs)
    if total == 0:
        raise ValueError("nothing to evaluate: every sequence is shorter than 2 tokens")
    base_nll = knn_nll = 0.0
    lm_seconds = 0.0
    search_before, queries_before = knn_lm.search_seconds, knn_lm.queries
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="eval", disable=not progress)
    for lo in range(0, len(jobs), batch_size):
        group = jobs[lo : lo + batch_size]
        started = time.perf_counter()
        keys, lm_lp, targets = _score_windows(lm, group)  # [m, d], [m], [m]
        lm_seconds += time.perf_counter() - started
        neighbours = knn_lm.neighbours(keys)
        knn_lp = knn_lm.target_log_probs(lm_lp, neighbours, targets)  # [m]
        base_nll -= lm_lp.double().sum().item()
        knn_nll -= knn_lp.double().sum().item()
        bar.update(len(targets))
    bar.close()
    return EvalResult(
        tokens=total,
        base_nll=base_nll,
        knn_nll=knn_nll,
        lm_seconds=lm_seconds,
        search_seconds=knn_lm.search_seconds - search_before,
        queries=knn_lm.queries - queries_before,
    )


def _score_windows(
    lm: LanguageModel, group: list[tuple[np.ndarray, Window]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, LM log p(target) and targets of every scored position in a batch of windows."""
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
    keys = out.keys[r, c]  # [m, d]
    log_probs = torch.log_softmax(out.logits[r, c].float(), dim=-1)  # [m, V], scored rows only
    lm_lp = log_probs.gather(1, t[:, None]).squeeze(1)  # [m]
    return keys, lm_lp, t
