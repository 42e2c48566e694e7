"""``KnnLM``: a language model, a datastore and a lambda policy, composed.

The hot path is batched: keys of many positions go to the store as one search per
``search_batch`` queries, and all math runs on [b, k] / [b, V] tensors.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from knn_store.knn import interpolate, knn_log_probs, knn_target_log_probs
from knn_store.lambdas import LambdaPolicy, QueryFeatures
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

    def neighbours(self, keys: torch.Tensor, *, with_cosine: bool | None = None) -> Neighbours:
        """Top-k neighbours of float [n, dim] keys, searched in batches.

        ``with_cosine`` (default: when the policy needs it) also reads each query's nearest
        key back from the store and fills ``Neighbours.cosine``.
        """
        if with_cosine is None:
            with_cosine = self.lambda_policy.needs_cosine
        queries = keys.detach().float().cpu().numpy()  # [n, dim]
        parts: list[Neighbours] = []
        started = time.perf_counter()
        for lo in range(0, len(queries), self.search_batch):
            part = self.store.search(
                queries[lo : lo + self.search_batch],
                k=self.k,
                exact=self.exact,
                hnsw_ef=self.hnsw_ef,
                domains=self.domains,
            )
            if with_cosine:
                part = replace(
                    part, cosine=self._nearest_cosine(queries[lo : lo + len(part)], part)
                )
            parts.append(part)
        self.search_seconds += time.perf_counter() - started
        self.queries += len(queries)
        return Neighbours.concat(parts, k=self.k)

    def _nearest_cosine(self, queries: np.ndarray, neighbours: Neighbours) -> np.ndarray:
        """float32 [b]: cosine of each query and its nearest stored key (0 without one)."""
        assert neighbours.point_ids is not None
        nearest = neighbours.point_ids[:, 0]  # [b]
        found = self.store.retrieve(
            [i for i in nearest if i is not None], with_keys=True, with_payload=False
        )
        keys = np.zeros_like(queries)  # [b, dim]; a zero key gives cosine 0
        for row, pid in enumerate(nearest):
            if pid is not None and str(pid) in found:
                keys[row] = found[str(pid)].key
        dot = (queries * keys).sum(-1)
        norms = np.linalg.norm(queries, axis=-1) * np.linalg.norm(keys, axis=-1)
        return (dot / np.maximum(norms, 1e-12)).astype(np.float32)

    def features(
        self,
        neighbours: Neighbours,
        *,
        lm_entropy: torch.Tensor,
        lm_max_log_prob: torch.Tensor,
    ) -> QueryFeatures:
        """What the lambda policy sees, from neighbours and two summaries of p_LM (float [n])."""
        device = lm_entropy.device
        cosine = None if neighbours.cosine is None else torch.from_numpy(neighbours.cosine)
        return QueryFeatures(
            sq_distances=torch.from_numpy(neighbours.sq_distances).to(device),
            token_ids=torch.from_numpy(neighbours.token_ids).to(device),
            lm_entropy=lm_entropy,
            lm_max_log_prob=lm_max_log_prob,
            cosine=None if cosine is None else cosine.to(device),
        )

    def target_log_probs(
        self,
        lm_target_log_probs: torch.Tensor,
        features: QueryFeatures,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Interpolated log p(target), float [n], from the LM's log p(target) (float [n])."""
        knn = knn_target_log_probs(
            features.sq_distances, features.token_ids, targets, temperature=self.temperature
        )  # [n]
        return interpolate(lm_target_log_probs, knn, self.lambda_policy(features))

    def next_token_log_probs(
        self, lm_log_probs: torch.Tensor, neighbours: Neighbours
    ) -> torch.Tensor:
        """Interpolated log p over the vocabulary, float [n, V], from the LM's [n, V]."""
        return self.distributions(lm_log_probs, neighbours)[2]

    def distributions(
        self, lm_log_probs: torch.Tensor, neighbours: Neighbours
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log p_kNN [n, V], lambda [n] and the interpolated log p [n, V]."""
        entropy, max_log_prob = lm_summary(lm_log_probs)
        features = self.features(neighbours, lm_entropy=entropy, lm_max_log_prob=max_log_prob)
        knn = knn_log_probs(
            features.sq_distances,
            features.token_ids,
            vocab_size=lm_log_probs.shape[-1],
            temperature=self.temperature,
        )
        lmbda = self.lambda_policy(features)
        return knn, lmbda, interpolate(lm_log_probs, knn, lmbda)


def lm_summary(lm_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log max-probability of each row of LM log-probs [n, V]: [n], [n]."""
    entropy = -(lm_log_probs.exp() * lm_log_probs).nan_to_num().sum(-1)
    return entropy, lm_log_probs.max(-1).values
