"""Lambda policies: how much weight p_kNN gets at each position.

A policy is a callable ``(sq_distances [b, k]) -> lambda [b]`` that holds no state across
calls, so eval and generation give the same answer at the same position.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LambdaPolicy(Protocol):
    def __call__(self, sq_distances: torch.Tensor) -> torch.Tensor:
        """float [b, k] squared distances -> float [b] lambdas in [0, 1]."""
        ...


class FixedLambda:
    """The same lambda everywhere (Khandelwal et al.'s interpolation).

    Queries with no neighbour at all get lambda = 0, so they keep the LM's distribution.

    >>> import torch
    >>> FixedLambda(0.25)(torch.tensor([[1.0, 2.0], [float("inf"), float("inf")]]))
    tensor([0.2500, 0.0000])
    """

    def __init__(self, lmbda: float) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"`lmbda` must lie in [0, 1], got {lmbda}")
        self.lmbda = lmbda

    def __call__(self, sq_distances: torch.Tensor) -> torch.Tensor:
        has_neighbour = torch.isfinite(sq_distances).any(dim=-1)  # [b]
        return torch.where(has_neighbour, self.lmbda, 0.0).to(torch.float32)

    def __repr__(self) -> str:
        return f"FixedLambda({self.lmbda})"
