"""An independent numpy reference for every number knnlm reports.

Written the slow, obvious way (float64, explicit per-row loops) so that it shares no code
and no tricks with the implementation it checks.
"""

from __future__ import annotations

import numpy as np


def brute_force_knn(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [b, k] and squared L2 distances [b, k] of the k nearest stored keys."""
    keys64 = keys.astype(np.float64)
    out_idx = np.full((len(queries), k), -1, dtype=np.int64)
    out_d2 = np.full((len(queries), k), np.inf)
    for i, q in enumerate(queries.astype(np.float64)):
        d2 = ((keys64 - q) ** 2).sum(axis=1)
        order = np.argsort(d2, kind="stable")[:k]
        out_idx[i, : len(order)] = order
        out_d2[i, : len(order)] = d2[order]
    return out_idx, out_d2


def knn_probs(
    d2: np.ndarray, values: np.ndarray, vocab_size: int, temperature: float
) -> np.ndarray:
    """p_kNN [b, V]: softmax over valid neighbours of -d2/T, summed per token value."""
    probs = np.zeros((len(d2), vocab_size))
    for i in range(len(d2)):
        valid = values[i] >= 0
        if not valid.any():
            continue
        logits = -d2[i, valid] / temperature
        w = np.exp(logits - logits.max())
        w /= w.sum()
        for token, weight in zip(values[i, valid], w, strict=True):
            probs[i, token] += weight
    return probs


def interpolated_log_prob(p_lm: np.ndarray, p_knn: np.ndarray, lmbda: np.ndarray) -> np.ndarray:
    """log(lambda * p_kNN + (1 - lambda) * p_LM), elementwise, lambda broadcast per row."""
    lmbda = np.asarray(lmbda, dtype=np.float64).reshape(-1, *([1] * (p_lm.ndim - 1)))
    with np.errstate(divide="ignore"):
        return np.log(lmbda * p_knn + (1 - lmbda) * p_lm)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
