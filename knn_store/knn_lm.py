"""``KnnLM``: a language model, a datastore and a lambda policy, composed.

The hot path is batched: keys of many positions go to the store as one search per
``search_batch`` queries, and all math runs on [b, k] / [b, V] tensors.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from knn_store.knn import interpolate, knn_log_probs, knn_target_log_probs
from knn_store.lambdas import LambdaPolicy
from knn_store.store.base import KnnStore, Neighbours


class KnnLM:
    """Retrieval plus interpolation on top of an LM's keys and log-probabilities.

    Args:
        store: the datastore to search.
        k: neighbours per query.
        temperature: softmax temperature T over -d^2.
        lambda_policy: maps neighbour distances to lambda per query.
        exact: full-scan search instead of HNSW.
        hnsw_ef: HNSW beam width (raised to at least k).
        search_batch: queries per search request.
        domains: restrict retrieval to these domain tags (None: all).
    """

    def __init__(
        self,
        store: KnnStore,
        *,
        k: int,
        temperature: float,
        lambda_policy: LambdaPolicy,
        exact: bool = False,
        hnsw_ef: int | None = None,
        search_batch: int = 256,
        domains: list[str] | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"`k` must be positive, got {k}")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {temperature}")
        if search_batch < 1:
            raise ValueError(f"`search_batch` must be positive, got {search_batch}")
        self.store = store
        self.k = k
        self.temperature = temperature
        self.lambda_policy = lambda_policy
        self.exact = exact
        self.hnsw_ef = hnsw_ef if hnsw_ef is not None else 2 * k
        self.search_batch = search_batch
        self.domains = domains
        self.search_seconds = 0.0  # cumulative, for reporting
        self.queries = 0

    def neighbours(self, keys: torch.Tensor) -> Neighbours:
        """Top-k neighbours of float [n, dim] keys, searched in batches."""
        queries = keys.detach().float().cpu().numpy()  # [n, dim]
        parts: list[Neighbours] = []
        started = time.perf_counter()
        for lo in range(0, len(queries), self.search_batch):
            parts.append(
                self.store.search(
                    queries[lo : lo + self.search_batch],
                    k=self.k,
                    exact=self.exact,
                    hnsw_ef=self.hnsw_ef,
                    domains=self.domains,
                )
            )
        self.search_seconds += time.perf_counter() - started
        self.queries += len(queries)
        if not parts:
            empty = np.zeros((0, self.k))
            return Neighbours(empty.astype(np.int64), empty.astype(np.float32))
        return Neighbours(
            token_ids=np.concatenate([p.token_ids for p in parts]),
            sq_distances=np.concatenate([p.sq_distances for p in parts]),
        )

    def target_log_probs(
        self, lm_target_log_probs: torch.Tensor, neighbours: Neighbours, targets: torch.Tensor
    ) -> torch.Tensor:
        """Interpolated log p(target), float [n], from the LM's log p(target) (float [n])."""
        sq, ids = _as_tensors(neighbours, lm_target_log_probs.device)  # [n, k] each
        knn = knn_target_log_probs(sq, ids, targets, temperature=self.temperature)  # [n]
        return interpolate(lm_target_log_probs, knn, self.lambda_policy(sq))

    def next_token_log_probs(
        self, lm_log_probs: torch.Tensor, neighbours: Neighbours
    ) -> torch.Tensor:
        """Interpolated log p over the vocabulary, float [n, V], from the LM's [n, V]."""
        sq, ids = _as_tensors(neighbours, lm_log_probs.device)
        knn = knn_log_probs(
            sq, ids, vocab_size=lm_log_probs.shape[-1], temperature=self.temperature
        )
        return interpolate(lm_log_probs, knn, self.lambda_policy(sq))


def _as_tensors(neighbours: Neighbours, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sq = torch.from_numpy(neighbours.sq_distances).to(device)
    ids = torch.from_numpy(neighbours.token_ids).to(device)
    return sq, ids
