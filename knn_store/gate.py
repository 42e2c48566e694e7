"""Adaptive retrieval: skip the search where the LM alone will do (after He et al. 2021).

Before any search, the LM already says how sure it is at a position. ``RetrievalGate`` is a
logistic model of those cheap features, fitted by ``knnlm tune`` to predict where retrieval
raises the probability of the true token; positions it scores below its threshold skip the
search and keep the LM's distribution exactly (lambda = 0).
"""

from __future__ import annotations

from typing import Any

import torch

from knn_store.lambdas import finite_numbers

GATE_FEATURES = ("lm_entropy", "lm_max_log_prob")


class RetrievalGate:
    """search = sigmoid(w . standardize(features) + b) >= threshold.

    Args:
        mean, std: per-feature standardization (``GATE_FEATURES`` order).
        weights, bias: the logistic model.
        threshold: a probability; 0 searches everywhere.

    >>> gate = RetrievalGate([1.0, -1.0], [1.0, 1.0], [1.0, 0.0], 0.0, threshold=0.5)
    >>> gate(torch.tensor([0.5, 3.0]), torch.tensor([-0.1, -2.0]))
    tensor([False,  True])
    """

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        weights: list[float],
        bias: float,
        *,
        threshold: float,
    ) -> None:
        n = len(GATE_FEATURES)
        if not len(mean) == len(std) == len(weights) == n:
            raise ValueError(f"a gate needs {n} means, stds and weights")
        # NaN weights would make every score NaN, below any threshold: every search skipped
        self.mean = finite_numbers("gate means", mean)
        self.std = finite_numbers("gate feature scales", std)
        self.weights = finite_numbers("gate weights", weights)
        (self.bias,) = finite_numbers("gate bias", [bias])
        (self.threshold,) = finite_numbers("gate threshold", [threshold])
        if any(s <= 0 for s in self.std):
            raise ValueError("gate feature scales must be positive")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"gate threshold must lie in [0, 1], got {threshold}")

    def scores(self, lm_entropy: torch.Tensor, lm_max_log_prob: torch.Tensor) -> torch.Tensor:
        """float32 [b]: the predicted probability that retrieval helps at each position."""
        x = torch.stack([lm_entropy.float(), lm_max_log_prob.float()], dim=-1)  # [b, 2]
        mean = torch.tensor(self.mean, device=x.device)
        std = torch.tensor(self.std, device=x.device)
        w = torch.tensor(self.weights, device=x.device)
        return torch.sigmoid(((x - mean) / std) @ w + self.bias)

    def __call__(self, lm_entropy: torch.Tensor, lm_max_log_prob: torch.Tensor) -> torch.Tensor:
        """bool [b]: True where the position should be searched."""
        return self.scores(lm_entropy, lm_max_log_prob) >= self.threshold

    def with_threshold(self, threshold: float) -> RetrievalGate:
        return RetrievalGate(self.mean, self.std, self.weights, self.bias, threshold=threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(GATE_FEATURES),
            "mean": self.mean,
            "std": self.std,
            "weights": self.weights,
            "bias": self.bias,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalGate:
        if list(data.get("features", [])) != list(GATE_FEATURES):
            raise ValueError(f"gate features {data.get('features')} are not {GATE_FEATURES}")
        return cls(
            data["mean"], data["std"], data["weights"], data["bias"], threshold=data["threshold"]
        )

    def __repr__(self) -> str:
        return f"RetrievalGate(threshold={self.threshold:.3g})"
