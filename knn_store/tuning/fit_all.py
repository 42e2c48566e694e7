"""Every policy fitted on validation and scored on test (``tune``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from knn_store.lambdas import (
    FixedLambda,
)
from knn_store.tuning.evidence import TuningData
from knn_store.tuning.sweeps import (
    Tuned,
    _Buckets,
    fit_fixed,
    fit_learned,
    fit_learned_temperature,
    sweep_temperatures,
)


@dataclass(frozen=True)
class TuneResult:
    """Every policy fitted on validation, with validation and (optionally) test NLLs."""

    policies: dict[str, Tuned]  # name -> fitted on validation
    validation: dict[str, float]  # name (and "base", "paper") -> mean NLL
    test: dict[str, float] | None
    validation_tokens: int
    test_tokens: int | None
    sweep_seconds: float
    # fixed-lambda perplexity curves: T -> [len(LAMBDA_GRID)] on validation
    curves: dict[float, list[float]]


def tune(
    validation: TuningData,
    test: TuningData | None = None,
    *,
    buckets: int = 64,
    learn_temperature: bool = False,
) -> TuneResult:
    """Fit every policy (fixed, buckets of d_min and of cosine, learned; with
    ``learn_temperature`` also ``learned-t``, T per position) on ``validation``; score each
    on both splits."""
    started = time.perf_counter()
    by_feature = [_Buckets(validation, f, buckets) for f in ("d_min", "cosine")]

    curves: dict[float, list[float]] = {}

    def fit_at(t: float) -> dict[str, Tuned]:
        losses = validation.lambda_losses(t)  # [G, n], shared by every policy at this T
        curves[t] = torch.exp(losses.mean(-1)).tolist()
        fits = [
            fit_fixed(validation, t, losses),
            *(b.fit(validation, t, losses) for b in by_feature),
        ]
        return {r.name: r for r in fits}

    fitted = sweep_temperatures(validation, fit_at)
    # One T for the learned policy: the buckets' (an MLP fit per T would cost minutes).
    fitted["learned"] = fit_learned(validation, fitted["buckets"].temperature)
    if learn_temperature:
        fitted["learned-t"] = fit_learned_temperature(validation, fitted["learned"])
    curves = dict(sorted(curves.items()))
    sweep_seconds = time.perf_counter() - started

    paper = FixedLambda(0.25), 1.0  # Khandelwal et al.'s hand-set values, for reference

    def score(data: TuningData) -> dict[str, float]:
        out = {"base": data.base_nll, "paper": data.nll(*paper)}
        out.update({name: data.nll(r.policy, r.temperature) for name, r in fitted.items()})
        return out

    return TuneResult(
        policies=fitted,
        validation=score(validation),
        test=None if test is None else score(test),
        validation_tokens=len(validation),
        test_tokens=None if test is None else len(test),
        sweep_seconds=sweep_seconds,
        curves=curves,
    )
