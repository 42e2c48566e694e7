"""Fitting one policy on the evidence: fixed lambda and T on a grid, buckets of d_min or
cosine (Drozdov et al. 2022), a learned MLP, and the learned policy with a temperature
head."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from knn_store.lambdas import (
    FEATURES,
    BucketLambda,
    FixedLambda,
    LambdaPolicy,
    LearnedLambda,
    bounded_log_scale,
)
from knn_store.tuning.evidence import _FLOAT32_MAX, LAMBDA_GRID, TuningData


@dataclass(frozen=True)
class Tuned:
    """A fitted policy, its temperature and its mean NLL on the tuning data."""

    name: str
    policy: LambdaPolicy
    temperature: float
    nll: float


def fit_fixed(data: TuningData, temperature: float, losses: torch.Tensor | None = None) -> Tuned:
    """The lambda of the grid with the lowest loss at temperature T."""
    if losses is None:
        losses = data.lambda_losses(temperature)
    mean = losses.mean(-1)  # [G]
    best = int(mean.argmin())
    lmbda = round(float(LAMBDA_GRID[best]), 2)  # a grid value, without float32 noise
    return Tuned("fixed", FixedLambda(lmbda), temperature, float(mean[best]))


def bucket_edges(values: torch.Tensor, buckets: int) -> list[float]:
    """Inner edges of ``buckets`` equal-population buckets of float [n] ``values``."""
    q = np.arange(1, buckets) / buckets
    return np.quantile(values.double().numpy(), q).tolist()


class _Buckets:
    """Equal-population buckets of one feature over the tuning tokens, assigned once."""

    def __init__(self, data: TuningData, feature: str, buckets: int) -> None:
        has = data.features.has_neighbour
        self.feature = feature
        self.count = buckets
        self.edges = bucket_edges(data.features.column(feature)[has], buckets)
        self.index = BucketLambda(feature, self.edges, [0.0] * buckets).buckets(data.features)
        self.populated = torch.bincount(self.index[has], minlength=buckets) > 0  # [B]

    def fit(self, data: TuningData, temperature: float, losses: torch.Tensor) -> Tuned:
        """Per bucket, the lambda of the grid with the lowest summed loss.

        Buckets that hold no tuning token (tied edges) take the best fixed lambda.
        """
        per_bucket = torch.zeros(len(LAMBDA_GRID), self.count, dtype=losses.dtype)
        per_bucket.index_add_(1, self.index, losses)  # [G, B]
        fallback = losses.mean(-1).argmin()
        choice = torch.where(self.populated, per_bucket.argmin(0), fallback)  # [B]
        lambdas = [round(x, 2) for x in LAMBDA_GRID[choice].tolist()]  # grid values
        policy = BucketLambda(self.feature, self.edges, lambdas)
        name = "buckets" if self.feature == "d_min" else f"{self.feature}-buckets"
        return Tuned(name, policy, temperature, data.nll(policy, temperature))


def fit_buckets(
    data: TuningData, temperature: float, *, feature: str = "d_min", buckets: int = 64
) -> Tuned:
    """Drozdov et al.'s policy at temperature T: one grid lambda per bucket of ``feature``."""
    return _Buckets(data, feature, buckets).fit(data, temperature, data.lambda_losses(temperature))


def sweep_temperatures(
    data: TuningData,
    fit_at: Callable[[float], dict[str, Tuned]],
    *,
    octaves: tuple[int, int] = (-6, 4),
) -> dict[str, Tuned]:
    """Per policy name, its best ``fit_at(T)`` over T = 2^i * median(d_min), then refined
    by half and quarter octaves around that policy's best.

    Distances scale with the model and the key type, so the grid is centred on the data
    rather than on the paper's T = 1. ``fit_at`` fits every policy at one T, so each T
    costs one pass over the cache whatever the number of policies.
    """
    d_min = data.features.sq_distances[:, 0]
    finite = d_min[torch.isfinite(d_min)]
    centre = float(finite.median()) if len(finite) else 1.0
    centre = centre if centre > 0 else 1.0
    tried: dict[float, dict[str, Tuned]] = {}

    def at(t: float) -> dict[str, Tuned]:
        t = float(f"{t:.4g}")  # stable keys and readable values
        if t not in tried:
            tried[t] = fit_at(t)
        return tried[t]

    for i in range(octaves[0], octaves[1] + 1):
        at(centre * 2.0**i)
    names = list(next(iter(tried.values())))

    def best(name: str) -> Tuned:
        return min((fits[name] for fits in tried.values()), key=lambda r: r.nll)

    for name in names:
        for step in (0.5, 0.25):
            t = best(name).temperature
            at(t * 2.0**step)
            at(t / 2.0**step)
    return {name: best(name) for name in names}


def _mlp(stack: list[torch.nn.Linear], h: torch.Tensor) -> torch.Tensor:
    """float [n, f] -> [n]: the layers with tanh between them, as ``LearnedLambda`` runs them."""
    for i, layer in enumerate(stack):
        h = layer(h)
        if i < len(stack) - 1:
            h = torch.tanh(h)
    return h.squeeze(-1)


def _mixed_nll(s: torch.Tensor, lm: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
    """Mean NLL of lambda = sigmoid(s) mixing log p_LM and log p_kNN (float [m] each):
    log(lambda) = logsigmoid(s), log(1 - lambda) = logsigmoid(-s)."""
    logsigmoid = torch.nn.functional.logsigmoid
    return -torch.logaddexp(logsigmoid(-s) + lm, logsigmoid(s) + knn).mean()


def _decay(layers: list[torch.nn.Linear], weight_decay: float) -> torch.Tensor:
    """The L2 penalty on the layers' weights."""
    return weight_decay * torch.stack([layer.weight.pow(2).sum() for layer in layers]).sum()


def fit_learned(
    data: TuningData,
    temperature: float,
    *,
    features: Sequence[str] = FEATURES,
    hidden: int = 16,
    steps: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> Tuned:
    """An MLP (``hidden=0``: logistic regression) from features to lambda, trained to
    maximize the interpolated log-likelihood of the tuning tokens directly.

    Full-batch L-BFGS: the model is tiny and the data fits in memory, so a second-order
    method converges in ``steps`` iterations where Adam needs thousands.
    """
    names = list(features)
    has = data.features.has_neighbour
    x = LearnedLambda.inputs(data.features, names)[has]  # [m, f]
    lm = data.lm_target_log_probs[has]
    knn = data.knn_log_probs(temperature)[has]
    mean, std = x.mean(0), x.std(0, correction=0).clamp(min=1e-6)
    z = (x - mean) / std

    gen = torch.Generator().manual_seed(seed)
    sizes = [len(names), *([hidden] if hidden else []), 1]
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    with torch.no_grad():  # deterministic init
        for layer in layers:
            layer.weight.copy_(
                torch.randn(layer.weight.shape, generator=gen) / math.sqrt(layer.in_features)
            )
            layer.bias.zero_()
        layers[-1].bias.fill_(-1.0)  # start near lambda = 0.27, the usual hand-set value
    params = [p for layer in layers for p in layer.parameters()]
    optim = torch.optim.LBFGS(
        params, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = _mixed_nll(_mlp(layers, z), lm, knn) + _decay(layers, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(closure)
    policy = LearnedLambda(
        names,
        mean.tolist(),
        std.tolist(),
        [(layer.weight.detach().tolist(), layer.bias.detach().tolist()) for layer in layers],
    )
    name = "learned" if hidden else "logistic"
    return Tuned(name, policy, temperature, data.nll(policy, temperature))


def fit_learned_temperature(
    data: TuningData,
    start: Tuned,
    *,
    hidden: int = 16,
    steps: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 1,
) -> Tuned:
    """``start`` (a fitted ``LearnedLambda``) with a temperature head: T(x) = T0 * exp(g(x))
    from the same standardized features, T0 = ``start.temperature``; g and lambda trained
    jointly on the interpolated log-likelihood, by full-batch L-BFGS as ``fit_learned``.

    The head's last layer starts at zero, so training starts exactly at ``start`` (g = 0:
    the global T), and the result is never worse on the tuning data: if training ends with
    a higher NLL, ``start``'s policy is kept. Each step is one pass over the [n, k] cache,
    in chunks (``TuningData.knn_log_probs_and_slope`` gives the derivative with respect to
    log T in closed form), so memory stays that of the sweep.
    """
    policy = start.policy
    if not isinstance(policy, LearnedLambda):
        raise ValueError(f"a temperature head extends a learned policy, not {policy!r}")
    names = policy.features
    base = start.temperature
    has = data.features.has_neighbour
    x = LearnedLambda.inputs(data.features, names)  # [n, f]
    z = (x - torch.tensor(policy.mean)) / torch.tensor(policy.std)  # as the policy does
    lm = data.lm_target_log_probs[has]

    def linear(weight: list[list[float]], bias: list[float]) -> torch.nn.Linear:
        w = torch.tensor(weight, dtype=torch.float32)
        layer = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
        return layer

    lam_layers = [linear(w, b) for w, b in policy.layers]  # from the fitted lambda
    gen = torch.Generator().manual_seed(seed)
    sizes = [len(names), *([hidden] if hidden else []), 1]
    t_layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    with torch.no_grad():
        for layer in t_layers:
            layer.weight.copy_(
                torch.randn(layer.weight.shape, generator=gen) / math.sqrt(layer.in_features)
            )
            layer.bias.zero_()
        t_layers[-1].weight.zero_()  # g = 0: the global T, where training starts
    layers = [*lam_layers, *t_layers]
    params = [p for layer in layers for p in layer.parameters()]
    optim = torch.optim.LBFGS(
        params, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optim.zero_grad()
        s = _mlp(lam_layers, z[has])  # [m]
        g = bounded_log_scale(_mlp(t_layers, z))  # [n], log(T / T0)
        temps = (g.detach().double() + math.log(base)).exp()
        temps = temps.clamp(min=torch.finfo(torch.float32).tiny, max=_FLOAT32_MAX).float()
        knn, slope = data.knn_log_probs_and_slope(temps)  # [n] each, no graph
        # value log p_kNN, gradient d log p_kNN / d g: first order is all L-BFGS uses
        knn = (knn + (g - g.detach()) * slope)[has]
        loss = _mixed_nll(s, lm, knn) + _decay(layers, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(closure)

    def lists(stack: list[torch.nn.Linear]) -> list[tuple[list[list[float]], list[float]]]:
        return [(layer.weight.detach().tolist(), layer.bias.detach().tolist()) for layer in stack]

    fitted = LearnedLambda(names, policy.mean, policy.std, lists(lam_layers), lists(t_layers))
    nll = data.nll(fitted, base)
    if not nll <= start.nll:  # also NaN: keep the start, which it began from
        return Tuned("learned-t", policy, base, start.nll)
    return Tuned("learned-t", fitted, base, nll)
