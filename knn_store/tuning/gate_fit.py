"""The retrieval gate's threshold: skip the search where the LM alone loses at most the
perplexity it may cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from knn_store.gate import RetrievalGate
from knn_store.knn import interpolate
from knn_store.tuning.evidence import TuningData
from knn_store.tuning.sweeps import Tuned


@dataclass(frozen=True)
class GateFit:
    """A gate fitted for one policy, with its share of skipped searches and its mean NLL
    (nats/token) on validation and, if given, test."""

    gate: RetrievalGate | None  # None: no threshold skips anything within the budget
    validation_skipped: float
    validation_nll: float
    test_skipped: float | None = None
    test_nll: float | None = None


def retrieval_gains(data: TuningData, tuned: Tuned) -> torch.Tensor:
    """float64 [n]: log p_kNN-LM(target) - log p_LM(target) under ``tuned``; what skipping
    the search at each position would lose (negative: it would gain)."""
    mixed = interpolate(
        data.lm_target_log_probs,
        data.policy_knn_log_probs(tuned.policy, tuned.temperature),
        tuned.policy(data.features),
    )
    return (mixed.double() - data.lm_target_log_probs.double()).nan_to_num()


def gated_nll(data: TuningData, tuned: Tuned, gate: RetrievalGate | None) -> tuple[float, float]:
    """Mean NLL of the kNN-LM under ``tuned`` when ``gate`` skips searches, and the share of
    positions it skips."""
    gains = retrieval_gains(data, tuned)
    lm = data.lm_target_log_probs.double()
    if gate is None:
        return -(lm + gains).mean().item(), 0.0
    searched = gate(data.features.lm_entropy, data.features.lm_max_log_prob)  # [n]
    return -(lm + gains * searched).mean().item(), 1.0 - searched.double().mean().item()


def fit_gate(
    validation: TuningData,
    tuned: Tuned,
    *,
    max_cost: float,
    test: TuningData | None = None,
    steps: int = 50,
) -> GateFit:
    """A logistic gate on the LM's entropy and top log-probability, fitted to tell where
    retrieval helps ``tuned``, with the threshold that skips the most searches while the
    validation perplexity rises by at most ``max_cost`` (0.01 = 1%).

    Each position is weighted by how much skipping it would change its log-likelihood, so
    the model learns where the gain is, not merely where there is any.
    """
    if not 0 <= max_cost < math.inf:
        raise ValueError(f"`max_cost` must be finite and >= 0, got {max_cost}")
    gains = retrieval_gains(validation, tuned)  # [n]
    f = validation.features
    x = torch.stack([f.lm_entropy.double(), f.lm_max_log_prob.double()], dim=-1)  # [n, 2]
    mean, std = x.mean(0), x.std(0, correction=0).clamp(min=1e-6)
    z = (x - mean) / std
    y = (gains > 0).double()
    weight = gains.abs() / gains.abs().mean().clamp(min=1e-12)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(closure)
    gate = RetrievalGate(
        mean.tolist(), std.tolist(), w.detach().tolist(), float(b.detach()), threshold=0.0
    )
    # Skip positions in order of score: the cheapest searches to give up come first. A
    # threshold fits after position j of that order where the next score is higher.
    scores = gate.scores(f.lm_entropy, f.lm_max_log_prob).double()  # [n]
    order = scores.argsort()
    ranked = scores[order]  # [n], ascending
    lost = gains[order].cumsum(0)  # [n], NLL * n added by skipping order[: j + 1]
    fits = lost <= len(gains) * math.log1p(max_cost)  # [n]
    fits[:-1] &= ranked[1:] > ranked[:-1]
    if not fits.any():
        return GateFit(None, 0.0, gated_nll(validation, tuned, None)[0])
    j = int(fits.nonzero().max())
    upper = ranked[j + 1].item() if j + 1 < len(ranked) else 1.0
    gate = gate.with_threshold((ranked[j].item() + upper) / 2)
    val_nll, val_skipped = gated_nll(validation, tuned, gate)
    fit = GateFit(gate, val_skipped, val_nll)
    if test is not None:
        test_nll, test_skipped = gated_nll(test, tuned, gate)
        fit = GateFit(gate, val_skipped, val_nll, test_skipped, test_nll)
    return fit
