"""The evidence tuning works on: ``collect`` runs the LM and one search per scored
position of a validation corpus and keeps what the kNN-LM's probability of the true token
depends on (``TuningData``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from knn_store.errors import CorpusError
from knn_store.knn import Temperature, interpolate, row_temperatures
from knn_store.knn_lm import KnnLM
from knn_store.lambdas import (
    LambdaPolicy,
    QueryFeatures,
)
from knn_store.progress import Progress, no_progress

LAMBDA_GRID = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
_ROWS = 8192  # rows per chunk of [n, k] work: bounds memory at ~4 * 8192 * k bytes
_MIN_EXPONENT = -87.0  # exp(-87) = 1.6e-38, the smallest normal float32 is 1.2e-38
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class TuningData:
    """Cached evidence for n scored positions of a corpus."""

    features: QueryFeatures  # sq_distances / token_ids [n, k], cosine [n]
    targets: torch.Tensor  # int64 [n]
    lm_target_log_probs: torch.Tensor  # float32 [n]
    _knn: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)
    _delta: torch.Tensor | None = field(default=None, repr=False)  # float32 [n, k], d - d_0
    _hits: torch.Tensor | None = field(default=None, repr=False)  # float32 [n, k], 1 = target

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, rows: torch.Tensor) -> TuningData:
        """The evidence of some positions: ``rows`` int64 [m] (or a bool mask [n])."""
        f = self.features
        return TuningData(
            features=QueryFeatures(
                f.sq_distances[rows],
                f.token_ids[rows],
                f.lm_entropy[rows],
                f.lm_max_log_prob[rows],
                None if f.cosine is None else f.cosine[rows],
            ),
            targets=self.targets[rows],
            lm_target_log_probs=self.lm_target_log_probs[rows],
        )

    @property
    def base_nll(self) -> float:
        return -self.lm_target_log_probs.double().mean().item()

    def knn_log_probs(self, temperature: Temperature) -> torch.Tensor:
        """log p_kNN(target), float32 [n], at one T (memoized per T) or at float [n], one T
        per position.

        The sweep's inner loop, so it works in place on row chunks: with rows sorted
        ascending, exp((d_0 - d_i) / T) is at most 1 and the nearest term is exactly 1, so
        the plain sums below cannot overflow. Exponents are clamped at -87 first: exp()
        of a smaller float32 is 10-20x slower (the underflow path) and yields less than
        1.7e-38, nothing next to the nearest term's 1; a target that far away gets about
        -87 - log(total) instead of ``knn_target_log_probs``'s smaller value, and either
        way the interpolated probability is the LM's to float precision.
        """
        per_row = isinstance(temperature, torch.Tensor)
        if not per_row and temperature in self._knn:
            return self._knn[temperature]
        out, _ = self._knn_pass(temperature, slope=False)
        if not per_row:
            self._knn[temperature] = out
        return out

    def knn_log_probs_and_slope(
        self, temperatures: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_kNN(target) at float [n] per-position temperatures, and its derivative
        with respect to log T at each position (float32 [n] each), for training a
        temperature head without an autograd graph over [n, k].

        With w_i = exp(-delta_i / T): d/dlog T of log(sum_hit w) - log(sum_all w) is
        (E_hit[delta] - E_all[delta]) / T, the w-weighted means of delta = d_i - d_0 over
        the neighbours voting for the target and over all of them. Entries clamped at -87
        have derivative 0 there, and count as 0; a position with no neighbour voting for
        its target has log p = -inf and slope 0.
        """
        out, slope = self._knn_pass(temperatures, slope=True)
        assert slope is not None
        return out, slope

    def _knn_pass(
        self, temperature: Temperature, *, slope: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._delta is None:  # T-independent parts, computed once per sweep
            sq = self.features.sq_distances
            nearest = sq[:, :1]
            self._delta = sq - torch.where(torch.isfinite(nearest), nearest, 0.0)  # [n, k] >= 0
            ids = self.features.token_ids
            # float, not bool: multiplying by a bool tensor converts it each time, 7x slower
            self._hits = (ids == self.targets[:, None].to(ids.dtype)).float()  # [n, k]
        delta, hits = self._delta, self._hits
        assert hits is not None
        t = row_temperatures(temperature, delta)  # a float, or float32 [n, 1]
        # -1/T, kept finite (a T under float32's range would give -inf, and 0 * -inf is NaN
        # at the nearest): every other neighbour still gets exponent -inf, the limit
        neg_inv: float | torch.Tensor = (
            max(-1.0 / t, -_FLOAT32_MAX)
            if isinstance(t, float)
            else (-1.0 / t).clamp(min=-_FLOAT32_MAX)
        )  # float, or [n, 1]
        n = len(self)
        out = torch.empty(n, dtype=torch.float32)
        grad = torch.empty(n, dtype=torch.float32) if slope else None
        buf = torch.empty((min(_ROWS, n), delta.shape[1]), dtype=torch.float32)
        for lo in range(0, n, _ROWS):
            rows = slice(lo, lo + _ROWS)
            w = buf[: len(delta[rows])]  # [c, k]
            scale = neg_inv if isinstance(neg_inv, float) else neg_inv[rows]  # float or [c, 1]
            torch.mul(delta[rows], scale, out=w)  # <= 0; -inf missing
            live = w > _MIN_EXPONENT if slope else None  # [c, k]; where the clamp is off
            w.clamp_(min=_MIN_EXPONENT).exp_()
            total = w.sum(1)  # [c]; >= 1, or ~0 for a row without neighbours
            if live is not None and grad is not None:
                wd = torch.where(live, w * delta[rows], 0.0)  # [c, k]; w * delta, finite
                all_mean = wd.sum(1) / total  # [c]
                hit_wd = wd.mul_(hits[rows]).sum(1)  # [c]
            on_target = w.mul_(hits[rows]).sum(1)  # [c]
            out[lo : lo + len(w)] = on_target.log() - total.log()  # -inf if no hit
            if live is not None and grad is not None:
                row_t = t if isinstance(t, float) else t[rows, 0]  # float or [c]
                g = (hit_wd / on_target - all_mean) / row_t  # [c]; NaN where no hit
                grad[lo : lo + len(w)] = torch.where(on_target > 0, g, 0.0)
        return out, grad

    def policy_knn_log_probs(self, policy: LambdaPolicy, temperature: float) -> torch.Tensor:
        """log p_kNN(target), float32 [n], at the temperatures ``policy`` gives on base
        ``temperature`` (the global T, or one per position with a temperature head)."""
        return self.knn_log_probs(policy.temperatures(self.features, temperature))

    def nll(self, policy: LambdaPolicy, temperature: float) -> float:
        """Mean negative log-likelihood (nats/token) of the kNN-LM under ``policy``, whose
        kNN temperature is ``temperature`` or, with a temperature head, scaled from it."""
        mixed = interpolate(
            self.lm_target_log_probs,
            self.policy_knn_log_probs(policy, temperature),
            policy(self.features),
        )
        return -mixed.double().mean().item()

    def lambda_losses(self, temperature: float) -> torch.Tensor:
        """float64 [len(LAMBDA_GRID), n]: -log p(target) for every lambda of the grid.

        With r = p_kNN / p_LM, -log((1 - l) p_LM + l p_kNN) = -log p_LM - log1p(l (r - 1)):
        one multiply-add and one log1p per cell. Positions without any neighbour get
        lambda 0 whatever the grid says, as in the policies.
        """
        lm = self.lm_target_log_probs.double()
        ratio = torch.exp(self.knn_log_probs(temperature).double() - lm)  # [n]
        # no neighbour: lambda is 0, i.e. a ratio of 1 makes every grid lambda cost -log p_LM
        ratio.masked_fill_(~self.features.has_neighbour, 1.0)
        loss = torch.outer(LAMBDA_GRID.double(), ratio.sub_(1.0))  # [G, n]
        return loss.log1p_().neg_().sub_(lm)


def collect(
    knn_lm: KnnLM, sequences: Sequence[np.ndarray], *, on_progress: Progress = no_progress
) -> TuningData:
    """One LM pass and one search per scored position of ``sequences`` (no gate: every
    position is searched), kept for sweeping."""
    parts: list[tuple[QueryFeatures, torch.Tensor, torch.Tensor]] = []
    for scored in knn_lm.score(
        sequences, use_gate=False, with_cosine=True, on_progress=on_progress, stage="retrieve"
    ):
        f = scored.features
        # int32 values halve the cache; a vocabulary has far fewer than 2^31 tokens
        features = QueryFeatures(
            f.sq_distances.cpu(),
            f.token_ids.to(torch.int32).cpu(),
            f.lm_entropy.cpu(),
            f.lm_max_log_prob.cpu(),
            None if f.cosine is None else f.cosine.cpu(),
        )
        parts.append((features, scored.lm.targets.cpu(), scored.lm.lm_target_log_prob.cpu()))
    if not parts:
        raise CorpusError("nothing to tune on: every text is shorter than 2 tokens")
    fs = [p[0] for p in parts]
    return TuningData(
        features=QueryFeatures(
            torch.cat([f.sq_distances for f in fs]),
            torch.cat([f.token_ids for f in fs]),
            torch.cat([f.lm_entropy for f in fs]),
            torch.cat([f.lm_max_log_prob for f in fs]),
            torch.cat([f.cosine for f in fs if f.cosine is not None]),
        ),
        targets=torch.cat([p[1] for p in parts]),
        lm_target_log_probs=torch.cat([p[2] for p in parts]),
    )
