"""Tuning math against float64 numpy brute force, and the policies' contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knn_store.knn import interpolate, knn_target_log_probs
from knn_store.lambdas import (
    FEATURES,
    BucketLambda,
    FixedLambda,
    LearnedLambda,
    QueryFeatures,
    policy_from_dict,
)
from knn_store.tuning import (
    LAMBDA_GRID,
    TuningData,
    fit_buckets,
    fit_fixed,
    fit_learned,
    sweep_temperatures,
    tune,
)
from tests.reference import knn_probs

V = 40
GRID = np.arange(100) / 100


def _data(seed: int = 0, n: int = 600, k: int = 24, empty_rows: int = 3) -> TuningData:
    """A cache where the kNN is right when the nearest key is close, and wrong otherwise."""
    rng = np.random.default_rng(seed)
    d2 = np.sort(rng.gamma(2.0, 2.0, size=(n, k)), axis=1).astype(np.float32)
    ids = rng.integers(0, V, size=(n, k))
    targets = rng.integers(0, V, size=n)
    close = d2[:, 0] < np.median(d2[:, 0])
    ids[close, :4] = targets[close, None]  # close rows: the nearest neighbours vote right
    d2[:empty_rows], ids[:empty_rows] = np.inf, -1
    d2[empty_rows : empty_rows + 5, -3:] = np.inf  # a few rows with fewer than k neighbours
    ids[empty_rows : empty_rows + 5, -3:] = -1
    lm = np.log(rng.uniform(0.01, 0.6, size=n)).astype(np.float32)
    features = QueryFeatures(
        sq_distances=torch.from_numpy(d2),
        token_ids=torch.from_numpy(ids).to(torch.int32),
        lm_entropy=torch.from_numpy(rng.uniform(0.5, 4, n).astype(np.float32)),
        lm_max_log_prob=torch.from_numpy(np.log(rng.uniform(0.1, 1, n)).astype(np.float32)),
        cosine=torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32)),
    )
    return TuningData(features, torch.from_numpy(targets), torch.from_numpy(lm))


def _reference_knn(data: TuningData, temperature: float) -> np.ndarray:
    d2 = data.features.sq_distances.double().numpy()
    ids = data.features.token_ids.long().numpy()
    p = knn_probs(d2, ids, V, temperature)  # [n, V] float64
    return p[np.arange(len(data)), data.targets.numpy()]


def _reference_losses(data: TuningData, temperature: float) -> np.ndarray:
    """[G, n] float64 -log p(target), lambda 0 where a row has no neighbour."""
    p_lm = np.exp(data.lm_target_log_probs.double().numpy())
    p_knn = _reference_knn(data, temperature)
    has = np.isfinite(data.features.sq_distances.numpy()[:, 0])
    lam = GRID[:, None] * has[None, :]
    return -np.log(lam * p_knn + (1 - lam) * p_lm)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 6.0])
def test_cached_knn_log_probs_match_reference_and_eval_math(temperature: float) -> None:
    data = _data()
    fast = data.knn_log_probs(temperature).double().numpy()
    want = _reference_knn(data, temperature)
    np.testing.assert_allclose(np.exp(fast), want, rtol=1e-5, atol=1e-12)
    f = data.features
    eval_math = knn_target_log_probs(
        f.sq_distances, f.token_ids.long(), data.targets, temperature=temperature
    )
    np.testing.assert_allclose(np.exp(fast), np.exp(eval_math.double().numpy()), atol=1e-6)
    assert data.knn_log_probs(temperature) is data.knn_log_probs(temperature)  # memoized


def test_lambda_losses_match_reference() -> None:
    data = _data()
    got = data.lambda_losses(2.0).numpy()
    np.testing.assert_allclose(got, _reference_losses(data, 2.0), rtol=1e-5)


def test_fixed_lambda_is_the_grid_minimum() -> None:
    data = _data()
    fitted = fit_fixed(data, 2.0)
    losses = _reference_losses(data, 2.0).mean(1)
    assert fitted.policy.lmbda == pytest.approx(GRID[losses.argmin()])
    assert fitted.nll == pytest.approx(losses.min(), rel=1e-6)
    assert data.nll(fitted.policy, 2.0) == pytest.approx(fitted.nll, rel=1e-6)


@pytest.mark.parametrize("feature", ["d_min", "cosine"])
def test_buckets_are_equal_population_with_the_best_lambda_each(feature: str) -> None:
    data = _data(n=800)
    fitted = fit_buckets(data, 2.0, feature=feature, buckets=8)
    policy = fitted.policy
    assert isinstance(policy, BucketLambda) and len(policy.lambdas) == 8
    has = data.features.has_neighbour.numpy()
    values = data.features.column(feature).numpy()[has]
    index = np.searchsorted(np.asarray(policy.edges), values, side="right")
    counts = np.bincount(index, minlength=8)
    assert counts.max() - counts.min() <= 1  # equal population (distinct values)
    losses = _reference_losses(data, 2.0)[:, has]
    for b in range(8):
        best = GRID[losses[:, index == b].sum(1).argmin()]
        assert policy.lambdas[b] == pytest.approx(best)
    lam = np.where(
        has,
        np.asarray(policy.lambdas)[
            np.searchsorted(
                np.asarray(policy.edges), data.features.column(feature).numpy(), side="right"
            ).clip(max=7)
        ],
        0.0,
    )
    p_lm = np.exp(data.lm_target_log_probs.double().numpy())
    want = -np.log(lam * _reference_knn(data, 2.0) + (1 - lam) * p_lm).mean()
    assert fitted.nll == pytest.approx(want, rel=1e-6)
    # the closest bucket trusts the datastore more than the farthest: the data says so
    if feature == "d_min":
        assert policy.lambdas[0] > policy.lambdas[-1]


def test_temperature_sweep_returns_each_policys_best() -> None:
    data = _data()
    calls: list[float] = []

    def fit_at(t: float):
        calls.append(t)
        return {"fixed": fit_fixed(data, t)}

    best = sweep_temperatures(data, fit_at, octaves=(-3, 3))["fixed"]
    assert len(calls) == len(set(calls))  # each T fitted once
    assert best.nll == min(fit_fixed(data, t).nll for t in calls)


def test_learned_policy_beats_a_fixed_lambda_where_features_matter() -> None:
    data = _data(n=2000)
    fixed = fit_fixed(data, 2.0)
    learned = fit_learned(data, 2.0, hidden=8)
    assert learned.nll < fixed.nll - 0.01
    logistic = fit_learned(data, 2.0, hidden=0)
    assert logistic.name == "logistic" and logistic.nll < fixed.nll
    lam = learned.policy(data.features)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert (lam[~data.features.has_neighbour] == 0).all()


def test_tune_reports_every_policy_on_both_splits() -> None:
    validation, test = _data(seed=1, n=1500), _data(seed=2, n=700)
    result = tune(validation, test, buckets=8)
    assert set(result.policies) == {"fixed", "buckets", "cosine-buckets", "learned"}
    assert set(result.validation) == {"base", "paper", *result.policies}
    for name, fitted in result.policies.items():
        assert result.validation[name] == pytest.approx(fitted.nll)
        assert result.test[name] == pytest.approx(test.nll(fitted.policy, fitted.temperature))
        assert result.validation[name] < result.validation["base"]
    assert result.test["paper"] == pytest.approx(test.nll(FixedLambda(0.25), 1.0))
    assert result.validation["base"] == pytest.approx(
        -validation.lm_target_log_probs.double().mean().item()
    )
    # one curve per temperature tried, over the whole lambda grid
    assert all(len(c) == len(LAMBDA_GRID) for c in result.curves.values())
    best = min(min(c) for c in result.curves.values())
    assert math.log(best) == pytest.approx(result.validation["fixed"], rel=1e-6)


@pytest.mark.parametrize(
    "policy",
    [
        FixedLambda(0.4),
        BucketLambda("d_min", [1.0, 3.0], [0.8, 0.4, 0.1]),
        BucketLambda("cosine", [0.0], [0.1, 0.6]),
        LearnedLambda(
            list(FEATURES),
            [0.1] * 5,
            [2.0] * 5,
            [([[0.5] * 5] * 3, [0.0] * 3), ([[1.0, -1.0, 0.5]], [0.2])],
        ),
    ],
    ids=repr,
)
def test_policies_survive_a_round_trip(policy) -> None:
    data = _data()
    again = policy_from_dict(policy.to_dict())
    torch.testing.assert_close(again(data.features), policy(data.features))
    assert (policy(data.features)[:3] == 0).all()  # rows without neighbours keep the LM


def test_feature_columns_match_numpy() -> None:
    data = _data()
    f = data.features
    ids = f.token_ids.numpy()
    top = ids[:, :16]
    agreement = ((top == top[:, :1]) & (top >= 0)).mean(1)
    np.testing.assert_allclose(f.column("agreement").numpy(), agreement, rtol=1e-6)
    np.testing.assert_allclose(
        f.column("lm_max_prob").numpy(), np.exp(f.lm_max_log_prob.numpy()), rtol=1e-6
    )
    assert np.isfinite(f.column("d_min").numpy()).all()  # empty rows get finite filler


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BucketLambda("entropy", [1.0], [0.1, 0.2]), "d_min"),
        (lambda: BucketLambda("d_min", [1.0], [0.1]), "lambdas"),
        (lambda: BucketLambda("d_min", [2.0, 1.0], [0.1, 0.2, 0.3]), "ascending"),
        (lambda: BucketLambda("d_min", [1.0], [0.1, 1.2]), r"\[0, 1\]"),
        (lambda: LearnedLambda(["nope"], [0.0], [1.0], [([[1.0]], [0.0])]), "unknown"),
        (lambda: policy_from_dict({"kind": "magic"}), "magic"),
    ],
)
def test_bad_policies_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_cosine_feature_must_be_computed() -> None:
    data = _data()
    f = QueryFeatures(
        data.features.sq_distances,
        data.features.token_ids,
        data.features.lm_entropy,
        data.features.lm_max_log_prob,
    )
    with pytest.raises(ValueError, match="cosine"):
        BucketLambda("cosine", [0.0], [0.1, 0.5])(f)


def _gate_data(n: int = 4000, seed: int = 0) -> TuningData:
    """Retrieval helps where the LM is unsure (high entropy) and hurts where it is sure."""
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(n, generator=g) * 4
    unsure = entropy > 2
    sq = torch.sort(torch.rand(n, 8, generator=g) * 10 + 1, dim=1).values
    ids = torch.randint(100, 200, (n, 8), generator=g, dtype=torch.int32)
    targets = torch.where(unsure, ids[:, 0].long(), torch.full((n,), 7))  # found, or not
    features = QueryFeatures(sq, ids, entropy, -entropy / 4, torch.rand(n, generator=g))
    lm = torch.where(unsure, torch.full((n,), -4.0), torch.full((n,), -0.2))
    return TuningData(features, targets, lm)


def test_fit_gate_skips_where_retrieval_does_not_help_within_the_budget() -> None:
    from knn_store.tuning import fit_fixed, fit_gate, gated_nll

    data = _gate_data()
    tuned = fit_fixed(data, 1.0)
    ungated, _ = gated_nll(data, tuned, None)
    fit = fit_gate(data, tuned, max_cost=0.01, test=_gate_data(seed=1))
    assert fit.gate is not None
    # the sure half gains nothing from retrieval (it only dilutes the LM): skipped
    assert fit.validation_skipped >= 0.45
    assert fit.validation_nll <= ungated + math.log1p(0.01) + 1e-9
    assert fit.test_skipped is not None and abs(fit.test_skipped - fit.validation_skipped) < 0.05
    # the cost is what skipping the chosen positions loses, computed by hand
    searched = fit.gate(data.features.lm_entropy, data.features.lm_max_log_prob)
    mixed = interpolate(
        data.lm_target_log_probs, data.knn_log_probs(tuned.temperature), tuned.policy(data.features)
    )
    by_hand = -torch.where(searched, mixed, data.lm_target_log_probs).double().mean().item()
    assert fit.validation_nll == pytest.approx(by_hand, rel=1e-9)
    # no budget: a threshold can still skip positions that lose nothing or gain
    strict = fit_gate(data, tuned, max_cost=0.0)
    assert strict.gate is None or strict.validation_nll <= ungated + 1e-12
