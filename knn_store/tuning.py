"""Choosing T and lambda: retrieve once, then sweep every policy on the cached evidence.

``collect`` runs the LM and one search per scored position of a validation corpus and keeps
what the kNN-LM's probability of the true token depends on: the k squared distances and
values, the LM's log p(target), its entropy and top probability, and the cosine to the
nearest key. Everything after that is tensor math on the cache:

- a fixed lambda: perplexity for every (T, lambda) on a grid;
- buckets (Drozdov et al. 2022): equal-population buckets of d_min (or cosine) on the tuning
  tokens, and per bucket the lambda of the grid with the lowest loss;
- a learned policy: a small MLP of several features, fit by gradient descent on the
  interpolated log-likelihood itself;
- the learned policy with a temperature head (``learned-t``): T per position from the same
  features, trained jointly with lambda, starting from the learned policy at its global T.

Policies are scored with the same callables that eval and generation use, so a perplexity
computed here is the one ``knnlm eval`` reports on the same text.

``check_tuning_size``, ``check_not_held`` and ``check_saveable`` are the rules by which
``knnlm tune`` refuses validation text too small or already stored, and policies that hurt.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from knn_store.errors import ConfigError, CorpusError
from knn_store.gate import RetrievalGate
from knn_store.knn import Temperature, interpolate, row_temperatures
from knn_store.knn_lm import KnnLM, LMView
from knn_store.lambdas import (
    FEATURES,
    BucketLambda,
    FixedLambda,
    LambdaPolicy,
    LearnedLambda,
    QueryFeatures,
    bounded_log_scale,
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


# --- sweeps --------------------------------------------------------------------------------


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


# --- the whole tuning run ------------------------------------------------------------------


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


# --- the retrieval gate --------------------------------------------------------------------


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


# --- what tune may fit and save ------------------------------------------------------------

MIN_TOKENS_PER_BUCKET = 32  # each lambda of an equal-population bucket fitted to this many
MIN_FIXED_TOKENS = 64  # one lambda and T; also the least text tune reports on
MIN_LEARNED_TOKENS = 256  # the MLP's 113 weights: two tokens or more each
MIN_LEARNED_T_TOKENS = 512  # with the temperature head's 113 more
MAX_HELD_SHARE = 0.5  # validation tokens that find their own key in the store, at most
HELD_COSINE = 0.9999  # a nearest key this close in direction is the query's own (distance 0)
# A nearest key this close in direction is a near copy of the query's context: 2-3% of the
# tokens of held-out Python files (SmolLM2, 47k-point stdlib store), 23% of a licence header
# that stored files repeat with small changes; text past MAX_NEAR_SHARE of them is too close
# to the datastore to say how retrieval does on other text.
NEAR_COSINE = 0.99
MAX_NEAR_SHARE = 0.15
HOLDOUT_FOLDS = 4  # each fold held out once while the policy is fitted again on the rest
NOISE_ERRORS = 2.0  # a validation gain under this many standard errors is noise ...
LARGE_TEST_CHANGE = 0.05  # ... and then a test perplexity change past 5% either way is refused


def tokens_needed(kind: str, *, buckets: int, held_out: bool = False) -> int:
    """The fewest validation tokens ``knnlm tune`` fits policy ``kind`` on ("none": it only
    reports); with ``held_out``, so that the policy can be fitted again on all but one of
    ``HOLDOUT_FOLDS`` folds."""
    if kind in ("buckets", "cosine-buckets"):
        fit = MIN_TOKENS_PER_BUCKET * buckets
    elif kind == "learned":
        fit = MIN_LEARNED_TOKENS
    elif kind == "learned-t":
        fit = MIN_LEARNED_T_TOKENS
    else:
        fit = MIN_FIXED_TOKENS
    if not held_out or kind == "none":
        return fit
    return -(-fit * HOLDOUT_FOLDS // (HOLDOUT_FOLDS - 1))


def check_tuning_size(tokens: int, kind: str, *, buckets: int, held_out: bool = True) -> None:
    """``CorpusError`` unless ``tokens`` validation tokens are enough for policy ``kind``
    (with ``held_out``: and to fit it again with a fold held out)."""
    needed = tokens_needed(kind, buckets=buckets, held_out=held_out)
    if tokens >= needed:
        return
    have = f"the validation text has {tokens:,} token{'' if tokens == 1 else 's'}"
    # --save fixed only where it could be fitted on this text
    fixed = kind != "fixed" and tokens >= tokens_needed("fixed", buckets=buckets, held_out=held_out)
    kept = HOLDOUT_FOLDS - 1
    if kind in ("buckets", "cosine-buckets"):
        fitted_on = tokens * kept // HOLDOUT_FOLDS if held_out else tokens
        most = fitted_on // MIN_TOKENS_PER_BUCKET
        fewer = f", at most --buckets {most}" if most >= 2 else ""
        per = f"{MIN_TOKENS_PER_BUCKET} per bucket" + (
            f", in {kept} of {HOLDOUT_FOLDS} folds" if held_out else ""
        )
        raise CorpusError(
            f"{have}, too few for {buckets:,} buckets: they need at least {needed:,} "
            f"({per}); give more validation text{fewer}" + (", or --save fixed" if fixed else "")
        )
    what = {
        "learned": "the learned policy",
        "learned-t": "the learned policy with a temperature per position",
    }.get(kind, "a fixed lambda and T")
    other = " or --save fixed" if fixed else ""
    raise CorpusError(
        f"{have}, too few to fit {what}: it needs at least {needed:,}; give more "
        f"validation text{other}"
    )


def held_share(data: TuningData) -> float:
    """The share of positions whose nearest stored key is their own key: cosine at least
    ``HELD_COSINE``, i.e. distance 0 up to the stored keys' precision. Text the datastore
    already holds finds itself everywhere."""
    cosine = data.features.cosine
    if cosine is None or not len(data):
        return 0.0
    own = (cosine >= HELD_COSINE) & data.features.has_neighbour
    return own.double().mean().item()


def near_share(data: TuningData) -> float:
    """The share of positions whose nearest stored key is a near copy of their own (cosine
    at least ``NEAR_COSINE``)."""
    cosine = data.features.cosine
    if cosine is None or not len(data):
        return 0.0
    near = (cosine >= NEAR_COSINE) & data.features.has_neighbour
    return near.double().mean().item()


def check_not_held(data: TuningData) -> None:
    """``CorpusError`` if more than ``MAX_HELD_SHARE`` of the validation text is in the
    datastore, or more than ``MAX_NEAR_SHARE`` of it nearly is: tuned on it, T and lambda
    would trust retrieval more than other text deserves."""
    share = held_share(data)
    if share > MAX_HELD_SHARE:
        raise CorpusError(
            f"the datastore already holds the validation text: {share:.0%} of its tokens find "
            f"their own key among the stored ones (cosine >= {HELD_COSINE}), more than "
            f"{MAX_HELD_SHARE:.0%}; tuned on it, T and lambda would trust retrieval blindly: "
            "tune on held-out text"
        )
    near = near_share(data)
    if near > MAX_NEAR_SHARE:
        raise CorpusError(
            f"the validation text is too close to the datastore: {near:.0%} of its tokens "
            f"find a near copy of their context (cosine >= {NEAR_COSINE}; held-out text finds "
            f"2-3%), more than {MAX_NEAR_SHARE:.0%}; tuned on it, T and lambda would trust "
            "retrieval more than other text deserves: tune on text like the text you will "
            "score, which the datastore does not repeat (or --force)"
        )


def fold_rows(n: int, folds: int = HOLDOUT_FOLDS) -> list[torch.Tensor]:
    """Row indices int64 [~n / folds] of each of ``folds`` contiguous folds of n positions
    (in corpus order: a fold is whole stretches of text, not scattered tokens)."""
    edges = [n * i // folds for i in range(folds + 1)]
    return [torch.arange(lo, hi) for lo, hi in itertools.pairwise(edges)]


def held_out_gains(
    validation: TuningData,
    kind: str,
    *,
    buckets: int,
    gate: RetrievalGate | None = None,
) -> torch.Tensor:
    """float64 [n]: each position's log-likelihood gain over the LM alone under the
    ``kind`` policy fitted again, as ``tune`` fits it, on the folds that do not hold the
    position (with the ``gate`` fitted on all of validation)."""
    n = len(validation)
    gains = torch.zeros(n, dtype=torch.float64)
    for rows in fold_rows(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[rows] = False
        fitted = tune(
            validation.take(keep), buckets=buckets, learn_temperature=kind == "learned-t"
        ).policies[kind]
        held = validation.take(rows)
        fold = retrieval_gains(held, fitted)
        if gate is not None:
            fold = fold * gate(held.features.lm_entropy, held.features.lm_max_log_prob)
        gains[rows] = fold
    return gains


def check_held_out(
    validation: TuningData, kind: str, *, buckets: int, gate: RetrievalGate | None = None
) -> float:
    """``ConfigError`` unless the ``kind`` policy, fitted without each fold in turn, beats
    the base LM on the fold it did not see; the held-out perplexity change (a fraction)."""
    gains = held_out_gains(validation, kind, buckets=buckets, gate=gate)
    change = math.expm1(min(-gains.mean().item(), 700.0))
    if not change < 0:
        raise ConfigError(
            f"the {kind} policy, fitted on {HOLDOUT_FOLDS - 1} of {HOLDOUT_FOLDS} folds of the "
            f"validation text, is no better than the base LM on the fold it was not fitted on "
            f"(perplexity {100 * change:+.2f}%, each fold in turn); nothing saved: give more "
            "validation text like the text you will score, or choose another --save "
            "(or --force)"
        )
    return change


def gain(data: TuningData, tuned: Tuned, gate: RetrievalGate | None = None) -> tuple[float, float]:
    """Mean log-likelihood gain per token (nats) of ``tuned`` (and its ``gate``) over the LM
    alone, and the standard error of that mean."""
    gains = retrieval_gains(data, tuned)  # float64 [n]
    if gate is not None:
        gains = gains * gate(data.features.lm_entropy, data.features.lm_max_log_prob)
    n = len(gains)
    if n == 0:
        return 0.0, math.inf
    error = gains.std().item() / math.sqrt(n) if n > 1 else math.inf
    return gains.mean().item(), error


def check_saveable(
    validation: TuningData,
    tuned: Tuned,
    *,
    gate: RetrievalGate | None = None,
    test: TuningData | None = None,
) -> None:
    """``ConfigError`` if ``tuned`` (with ``gate``) should not be saved: it is worse than the
    base LM on validation, or its validation gain is within noise (under ``NOISE_ERRORS``
    standard errors) while it changes the test perplexity by more than ``LARGE_TEST_CHANGE``
    either way (validation then does not predict test)."""
    mean, error = gain(validation, tuned, gate)
    change = 100 * math.expm1(min(-mean, 700.0))  # validation perplexity, percent
    if not mean >= -1e-12:
        raise ConfigError(
            f"the fitted {tuned.name} policy is worse than the base LM on the validation text "
            f"(perplexity {change:+.2f}%); nothing saved: give more validation text, or "
            "choose another --save"
        )
    if test is None or mean >= NOISE_ERRORS * error:
        return
    test_change = math.expm1(min(-gain(test, tuned, gate)[0], 700.0))
    if abs(test_change) > LARGE_TEST_CHANGE:
        raise ConfigError(
            f"the fitted {tuned.name} policy's validation gain is within noise (perplexity "
            f"{change:+.2f}% +- {100 * error:.2f}%, under {NOISE_ERRORS:g} standard errors) "
            f"while it changes the test perplexity by {100 * test_change:+.1f}%: the validation "
            "text does not predict the test text; nothing saved: tune on more validation text"
        )


# --- the levers: document cache and pointer following (issue 16) ---------------------------

CACHE_TEMPERATURE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # times the policy's T
CACHE_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)  # 0: the cache off, if nothing beats it
POINTER_THRESHOLDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # those <= k are tried


@dataclass(frozen=True)
class LeverFit:
    """The document cache and pointer threshold fitted for one policy on validation.

    ``cache_nll`` [T, W] is the mean NLL of every cache temperature and weight of the grid
    (no pointers); ``pointer_nll`` and ``pointer_saved`` give, per threshold tried
    (ascending, 0 first: pointers off), the mean NLL with the chosen cache and the share of
    positions scored from followed pointers instead of a search.
    """

    cache_temperature: float | None  # None: the cache is off (weight 0 won)
    cache_weight: float
    cache_temperatures: list[float]
    cache_weights: list[float]
    cache_nll: list[list[float]]
    pointer_min: int  # 0: no threshold saves a search within the budget, or none tried
    thresholds: list[int]
    pointer_nll: list[float]
    pointer_saved: list[float]
    tokens: int

    @property
    def nll(self) -> float:
        """Mean NLL of the chosen cache and threshold on validation."""
        return self.pointer_nll[self.thresholds.index(self.pointer_min)]

    @property
    def searches_saved(self) -> float:
        return self.pointer_saved[self.thresholds.index(self.pointer_min)]


def fit_levers(
    knn_lm: KnnLM,
    sequences: Sequence[np.ndarray],
    *,
    max_cost: float,
    pointers: bool,
    on_progress: Progress = no_progress,
) -> LeverFit:
    """Fit the document cache (temperature and weight) and the pointer threshold for
    ``knn_lm``, which carries the fitted policy, T and gate, on validation ``sequences``.

    One LM pass keeps each batch's view (keys and LM summaries, not the [m, V]
    distributions) and scores it without pointers and under every cache temperature. The
    cache is position-wise, mixed after the kNN-LM, so its grid is tensor math on each
    temperature's log p_cache(target); it is fitted first, by perplexity, without pointers.

    Pointer following is a walk from position to position, so a threshold cannot be swept
    on cached evidence: each threshold tried is a run over the kept views, in ``score``'s
    order, the one ``knnlm eval`` makes. A lower threshold follows more and saves more
    searches, and costs more perplexity, so the threshold that saves the most searches
    while the validation perplexity (with the cache) rises by at most ``max_cost`` (0.005 =
    0.5%) over no pointers is found by bisection over ``POINTER_THRESHOLDS``: about
    log2(11) runs instead of 11 (it assumes the cost does not rise with the threshold, as
    measured on kernel docs). ``pointers=False`` (a collection without successor links)
    tries none.
    """
    from knn_store.doc_cache import CacheState, DocumentCache
    from knn_store.pointers import PointerState

    if not 0 <= max_cost < math.inf:
        raise ValueError(f"`max_cost` must be finite and >= 0, got {max_cost}")
    temps = [knn_lm.temperature * f for f in CACHE_TEMPERATURE_FACTORS]
    caches = [DocumentCache(temperature=t, weight=0.0) for t in temps]
    cache_states = [CacheState() for _ in temps]
    plain = knn_lm.with_options(pointer_min=0, cache=None)
    batches = knn_lm.window_batches(sequences)
    total = sum(len(w.positions) for batch in batches for _, _, w in batch)
    views: list[LMView] = []
    plain_lp: list[torch.Tensor] = []  # float32 [m] per batch, no pointers
    cache_lp: list[list[torch.Tensor]] = [[] for _ in temps]
    has_memory: list[torch.Tensor] = []
    done = 0
    on_progress("levers", done, total)
    for batch in batches:
        view = knn_lm.lm_view(batch)
        views.append(view)
        plain_lp.append(plain.finish(view).log_prob.cpu())
        for cache, state, out in zip(caches, cache_states, cache_lp, strict=True):
            got = cache.target_log_probs(
                state,
                sequence=view.sequence,
                position=view.position,
                keys=view.keys,
                targets=view.targets,
                vocab_size=knn_lm.lm.vocab_size,
            )
            out.append(got.target_log_prob.cpu())
        has_memory.append(got.has_memory.cpu())
        done += len(view.targets)
        on_progress("levers", done, total)
    if not done:
        raise CorpusError("nothing to tune on: every text is shorter than 2 tokens")
    cached = torch.stack([torch.cat(parts) for parts in cache_lp])  # [T, n]
    has = torch.cat(has_memory)  # [n]

    def mixed_nll(lp: torch.Tensor, cache_row: torch.Tensor, weight: float) -> float:
        w = torch.where(has, weight, 0.0).float()  # as DocumentCache.mix
        return -interpolate(lp, cache_row, w).double().mean().item()

    base = torch.cat(plain_lp)  # [n]
    grid = [[mixed_nll(base, cached[ti], w) for w in CACHE_WEIGHTS] for ti in range(len(temps))]
    flat = torch.tensor(grid, dtype=torch.float64)  # [T, W]
    ti, wi = divmod(int(flat.argmin()), len(CACHE_WEIGHTS))  # the first of ties
    weight = CACHE_WEIGHTS[wi]
    row = cached[ti]
    tried: dict[int, tuple[float, float]] = {0: (mixed_nll(base, row, weight), 0.0)}
    budget = tried[0][0] + math.log1p(max_cost)

    def run(threshold: int) -> tuple[float, float]:
        """Validation NLL (with the cache) and share of positions followed at a threshold."""
        if threshold not in tried:
            follower = knn_lm.with_options(pointer_min=threshold, cache=None)
            state = PointerState()
            stage, scored, parts = f"pointers >= {threshold}", 0, []
            on_progress(stage, scored, total)
            for view in views:
                parts.append(follower.finish(view, pointers=state).log_prob.cpu())
                scored += len(view.targets)
                on_progress(stage, scored, total)
            tried[threshold] = (mixed_nll(torch.cat(parts), row, weight), state.followed / done)
        return tried[threshold]

    # from the least following down, while each fits: the lowest of that unbroken run
    best = 0
    for threshold in reversed([t for t in POINTER_THRESHOLDS if pointers and t <= knn_lm.k]):
        nll, saved = run(threshold)
        if nll > budget:
            break
        if saved > 0:  # a threshold that never follows changes nothing: walk on
            best = threshold
    thresholds = sorted(tried)
    return LeverFit(
        cache_temperature=temps[ti] if weight else None,
        cache_weight=weight,
        cache_temperatures=temps,
        cache_weights=list(CACHE_WEIGHTS),
        cache_nll=grid,
        pointer_min=best,
        thresholds=thresholds,
        pointer_nll=[tried[t][0] for t in thresholds],
        pointer_saved=[tried[t][1] for t in thresholds],
        tokens=done,
    )
