"""The kNN temperature learned per position: per-row T in the kNN math against numpy, the
temperature head's saved form, its fit against a brute-force grid of global T, and eval
with it against a recomputation from the neighbours."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnLM, load_language_model, open_store
from knn_store.errors import StoreDamaged
from knn_store.knn import knn_log_probs, knn_target_log_probs, neighbour_log_weights
from knn_store.lambdas import (
    MAX_LOG_TEMPERATURE_SCALE,
    FixedLambda,
    LearnedLambda,
    QueryFeatures,
    policy_from_dict,
)
from knn_store.saved_policy import SavedPolicy
from knn_store.store.config import SearchOptions
from knn_store.tuning import Tuned, TuningData, fit_learned, fit_learned_temperature, tune
from tests.reference import interpolated_log_prob, knn_probs
from tests.test_cli import Knnlm, _json_ok
from tests.test_tune_cli import TEST, VALIDATION

V = 12


def _neighbours(seed: int, b: int = 7, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [b, k] ascending squared distances and int64 [b, k] values, with an empty
    row, a row with missing neighbours and a row of tied distances."""
    rng = np.random.default_rng(seed)
    d2 = np.sort(rng.gamma(2.0, 3.0, size=(b, k)), axis=1).astype(np.float32)
    ids = rng.integers(0, V, size=(b, k))
    d2[0], ids[0] = np.inf, -1  # no neighbour
    d2[1, -2:], ids[1, -2:] = np.inf, -1  # fewer than k
    d2[2] = 4.0  # all tied
    return torch.from_numpy(d2), torch.from_numpy(ids)


# --- knn.py: a temperature per row ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_per_row_temperature_equals_each_row_with_its_own_scalar(seed: int) -> None:
    d2, ids = _neighbours(seed)
    temps = torch.tensor([0.5, 1e-30, 3.0, 1e30, 0.05, 7.0, 1.0])  # extreme ones too
    targets = ids[:, 1].clamp(min=0)
    full = knn_log_probs(d2, ids, vocab_size=V, temperature=temps)  # [b, V]
    target = knn_target_log_probs(d2, ids, targets, temperature=temps)  # [b]
    weights = neighbour_log_weights(d2, temps)  # [b, k]
    assert not full.isnan().any() and not target.isnan().any() and not weights.isnan().any()
    for i, t in enumerate(temps.tolist()):
        row = slice(i, i + 1)
        torch.testing.assert_close(
            full[row], knn_log_probs(d2[row], ids[row], vocab_size=V, temperature=t)
        )
        torch.testing.assert_close(
            target[row], knn_target_log_probs(d2[row], ids[row], targets[row], temperature=t)
        )
        torch.testing.assert_close(weights[row], neighbour_log_weights(d2[row], t))
    # and against float64 numpy where T is moderate (the extremes are limits numpy lacks)
    for i, t in enumerate(temps.tolist()):
        if 1e-3 < t < 1e3:
            want = knn_probs(d2[i : i + 1].double().numpy(), ids[i : i + 1].numpy(), V, t)
            np.testing.assert_allclose(full[i].exp().numpy(), want[0], atol=1e-6)
    has = torch.isfinite(d2[:, 0])
    torch.testing.assert_close(full.exp().sum(-1)[has], torch.ones(int(has.sum())))
    assert torch.isneginf(full[0]).all()  # the empty row


def test_float64_temperatures_beyond_float32_are_their_limits() -> None:
    d2, ids = _neighbours(2)
    temps = torch.full((len(d2),), 1e-300, dtype=torch.float64)  # 0 in float32
    p = knn_log_probs(d2, ids, vocab_size=V, temperature=temps).exp()  # [b, V]
    nearest = knn_log_probs(d2, ids, vocab_size=V, temperature=1e-6).exp()
    torch.testing.assert_close(p, nearest)
    huge = torch.full((len(d2),), 1e300, dtype=torch.float64)  # inf in float32
    even = knn_log_probs(d2, ids, vocab_size=V, temperature=huge).exp()
    torch.testing.assert_close(even, knn_log_probs(d2, ids, vocab_size=V, temperature=1e9).exp())


@pytest.mark.parametrize(
    "temps",
    [
        torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0, 1.0, 1.0]),
        torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0]),
        torch.tensor([1.0, 1.0, 1.0, float("inf"), 1.0, 1.0, 1.0]),
        torch.ones(6),  # not one per row
        torch.ones(7, 1),
        torch.ones(7, dtype=torch.int64),
    ],
)
def test_bad_per_row_temperatures_are_a_value_error(temps: torch.Tensor) -> None:
    d2, ids = _neighbours(0)
    with pytest.raises(ValueError, match="temperature"):
        knn_log_probs(d2, ids, vocab_size=V, temperature=temps)
    with pytest.raises(ValueError, match="temperature"):
        knn_target_log_probs(d2, ids, ids[:, 0].clamp(min=0), temperature=temps)


# --- the policy's saved form ----------------------------------------------------------------

NAMES = ["d_min", "lm_entropy"]


def _head_policy(seed: int = 0, hidden: int = 3) -> LearnedLambda:
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(1, 2)).tolist(), [0.1])]
    head = [
        (rng.normal(size=(hidden, 2)).tolist(), rng.normal(size=hidden).tolist()),
        (rng.normal(size=(1, hidden)).tolist(), [0.3]),
    ]
    return LearnedLambda(NAMES, [1.0, 2.0], [0.5, 1.5], layers, head)


def _features(d2: torch.Tensor, ids: torch.Tensor, seed: int = 0) -> QueryFeatures:
    rng = np.random.default_rng(seed)
    b = len(d2)
    return QueryFeatures(
        d2,
        ids,
        torch.from_numpy(rng.uniform(0.2, 4.0, b).astype(np.float32)),
        torch.from_numpy(np.log(rng.uniform(0.1, 1.0, b)).astype(np.float32)),
    )


def _reference_temperatures(policy: LearnedLambda, f: QueryFeatures, base: float) -> np.ndarray:
    """T per row, float64 [b], from the policy's saved numbers alone."""
    d_min = f.sq_distances[:, 0].double().numpy()
    d_min = np.where(np.isfinite(d_min), d_min, np.finfo(np.float32).max)
    x = np.stack([np.log1p(np.minimum(d_min, 1e30)), f.lm_entropy.double().numpy()], -1)
    h = (x - np.asarray(policy.mean)) / np.asarray(policy.std)
    saved = policy.to_dict()["temperature_layers"]
    for i, (w, b) in enumerate(saved):
        h = h @ np.asarray(w).T + np.asarray(b)
        if i < len(saved) - 1:
            h = np.tanh(h)
    g = MAX_LOG_TEMPERATURE_SCALE * np.tanh(h[:, 0] / MAX_LOG_TEMPERATURE_SCALE)
    return base * np.exp(g)


def test_head_round_trips_and_sets_t_per_row() -> None:
    policy = _head_policy()
    data = policy.to_dict()
    again = policy_from_dict(data)
    assert isinstance(again, LearnedLambda) and again.to_dict() == data
    d2, ids = _neighbours(3)
    f = _features(d2, ids)
    temps = again.temperatures(f, 2.5)
    assert isinstance(temps, torch.Tensor) and temps.dtype == torch.float32
    np.testing.assert_allclose(temps.numpy(), _reference_temperatures(policy, f, 2.5), rtol=1e-5)
    torch.testing.assert_close(again(f), policy(f))
    assert len(set(temps.tolist())) > 1  # it does vary by position


def test_a_policy_saved_without_a_head_loads_and_behaves_as_before() -> None:
    old = {
        "kind": "learned",
        "features": NAMES,
        "mean": [1.0, 2.0],
        "std": [0.5, 1.5],
        "layers": [[[[0.4, -0.7]], [0.2]]],
    }
    policy = policy_from_dict(old)
    assert policy.to_dict() == old  # no head written back
    d2, ids = _neighbours(4)
    f = _features(d2, ids)
    assert policy.temperatures(f, 1.7) == 1.7  # the global T, a float: the old code path
    z = (LearnedLambda.inputs(f, NAMES).double() - torch.tensor([1.0, 2.0])) / torch.tensor(
        [0.5, 1.5]
    )
    want = torch.sigmoid(z @ torch.tensor([0.4, -0.7], dtype=torch.float64) + 0.2).clamp(max=0.99)
    want = torch.where(f.has_neighbour, want, 0.0)
    np.testing.assert_allclose(policy(f).numpy(), want.numpy(), rtol=1e-6)
    assert FixedLambda(0.3).temperatures(f, 1.7) == 1.7


@pytest.mark.parametrize(
    "head",
    [
        [],  # no layer
        [[[[1.0, 2.0, 3.0]], [0.0]]],  # three inputs for two features
        [[[[1.0, 2.0]], [0.0, 1.0]]],  # weight and bias disagree
        [[[[1.0, 2.0], [0.5, 0.5]], [0.0, 1.0]]],  # two outputs
        [[[[1.0, float("nan")]], [0.0]]],
        [[[[1.0, 1e39]], [0.0]]],  # not a float32
    ],
)
def test_a_damaged_head_fails_when_read(head: list) -> None:
    data = {**_head_policy().to_dict(), "temperature_layers": head}
    with pytest.raises(ValueError):
        policy_from_dict(data)
    saved = {
        "policy": data,
        "temperature": 1.0,
        "k": 8,
        "model_fingerprint": "m",
        "key_type": "final",
    }
    with pytest.raises(StoreDamaged, match="knnlm tune"):
        SavedPolicy.from_dict(saved, collection="c")


def test_saved_policy_with_a_head_round_trips() -> None:
    saved = SavedPolicy(_head_policy(), 2.0, 8, "fingerprint", "final")
    again = SavedPolicy.from_dict(saved.to_dict(), collection="c")
    assert again.policy.to_dict() == saved.policy.to_dict() and again.temperature == 2.0


def test_the_head_keeps_t_finite_for_any_input() -> None:
    big = [(([[1e30, 1e30]]), [0.0])]  # a linear head: unbounded before the soft bound
    policy = LearnedLambda(NAMES, [0.0, 0.0], [1.0, 1.0], [([[0.1, 0.1]], [0.0])], big)
    d2, ids = _neighbours(5)
    f = _features(d2, ids)
    for base in (1e-30, 1.0, 1e35):
        temps = policy.temperatures(f, base)
        assert isinstance(temps, torch.Tensor)
        assert torch.isfinite(temps).all() and (temps > 0).all()
        assert not knn_log_probs(d2, ids, vocab_size=V, temperature=temps).isnan().any()
    with pytest.raises(ValueError, match="base temperature"):
        policy.temperatures(f, float("nan"))


# --- fitting ---------------------------------------------------------------------------------


def _two_populations(seed: int, n: int = 1600, k: int = 16) -> TuningData:
    """Two kinds of position, told apart by the LM's entropy, whose right T differs 10x:
    the same neighbourhood structure, with squared distances 10x larger in the second."""
    rng = np.random.default_rng(seed)
    d2 = np.sort(rng.gamma(2.0, 1.0, size=(n, k)), axis=1)
    ids = rng.integers(0, V, size=(n, k))
    targets = rng.integers(0, V, size=n)
    # the target is one of the nearest four at random: an interior best T
    pick = rng.integers(0, 4, size=n)
    ids[np.arange(n), pick] = targets
    far = np.arange(n) >= n // 2
    d2[far] *= 10.0
    entropy = np.where(far, 3.0, 1.0) + rng.normal(0, 0.1, n)
    lm = np.log(rng.uniform(0.05, 0.3, size=n))
    features = QueryFeatures(
        torch.from_numpy(d2.astype(np.float32)),
        torch.from_numpy(ids).to(torch.int32),
        torch.from_numpy(entropy.astype(np.float32)),
        torch.from_numpy(np.log(rng.uniform(0.2, 0.9, n)).astype(np.float32)),
        torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32)),
    )
    return TuningData(features, torch.from_numpy(targets), torch.from_numpy(lm.astype(np.float32)))


def test_per_row_knn_log_probs_and_slope_match_float64_reference() -> None:
    data = _two_populations(0, n=300)
    temps = torch.from_numpy(np.random.default_rng(1).uniform(0.3, 20, len(data))).float()
    got, slope = data.knn_log_probs_and_slope(temps)
    d2 = data.features.sq_distances.double().numpy()
    ids = data.features.token_ids.long().numpy()
    rows = np.arange(len(data))
    targets = data.targets.numpy()

    def reference(t: np.ndarray) -> np.ndarray:
        return np.log(
            np.array([knn_probs(d2[i : i + 1], ids[i : i + 1], V, t[i])[0] for i in rows])[
                rows, targets
            ]
        )

    t64 = temps.double().numpy()
    np.testing.assert_allclose(got.numpy(), reference(t64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data.knn_log_probs(temps).numpy(), got.numpy())
    eps = 1e-4  # central difference in log T
    numeric = (reference(t64 * math.exp(eps)) - reference(t64 * math.exp(-eps))) / (2 * eps)
    np.testing.assert_allclose(slope.numpy(), numeric, rtol=1e-3, atol=1e-4)


def test_learned_temperature_beats_every_global_temperature() -> None:
    torch.manual_seed(0)
    validation = _two_populations(1)
    # brute force: the learned lambda (same features) at each T of a fine grid
    grid = [0.1 * 2 ** (i / 2) for i in range(0, 23)]  # 0.1 .. 205, half octaves
    per_t = [fit_learned(validation, t, hidden=0, steps=30) for t in grid]
    best = min(per_t, key=lambda r: r.nll)
    assert grid[0] < best.temperature < grid[-1]  # the grid brackets the best global T
    start = fit_learned(validation, best.temperature)
    fitted = fit_learned_temperature(validation, start)
    assert fitted.name == "learned-t" and fitted.temperature == best.temperature
    assert isinstance(fitted.policy, LearnedLambda) and fitted.policy.learns_temperature
    assert fitted.nll == pytest.approx(validation.nll(fitted.policy, fitted.temperature))
    assert fitted.nll < start.nll - 0.01  # nats/token
    assert fitted.nll < min(r.nll for r in per_t) - 0.01
    # and it found the 10x: T per population, each near that population's best
    temps = fitted.policy.temperatures(validation.features, fitted.temperature)
    assert isinstance(temps, torch.Tensor)
    near, far = temps[: len(temps) // 2].median(), temps[len(temps) // 2 :].median()
    assert 5 < float(far / near) < 20
    # on held-out text of the same kind too, through tune's own scoring
    result = tune(validation, _two_populations(2), buckets=4, learn_temperature=True)
    assert result.test is not None
    assert result.test["learned-t"] < result.test["learned"] - 0.01
    assert result.validation["learned-t"] <= result.validation["learned"]


def test_learned_temperature_never_starts_worse() -> None:
    # one population: nothing for a head to learn, and the fit keeps the start's NLL or better
    data = _two_populations(3)
    first = TuningData(
        QueryFeatures(
            data.features.sq_distances[:800],
            data.features.token_ids[:800],
            data.features.lm_entropy[:800],
            data.features.lm_max_log_prob[:800],
            data.features.cosine[:800] if data.features.cosine is not None else None,
        ),
        data.targets[:800],
        data.lm_target_log_probs[:800],
    )
    start = fit_learned(first, 1.0)
    fitted = fit_learned_temperature(first, start)
    assert fitted.nll <= start.nll
    with pytest.raises(ValueError, match="learned policy"):
        fit_learned_temperature(first, Tuned("fixed", FixedLambda(0.3), 1.0, start.nll))


# --- eval with the head against the neighbours ----------------------------------------------


@pytest.fixture
def store_and_lm(tiny_models: dict[str, Path], corpus_dir: Path, settings_factory):
    settings = settings_factory(tiny_models["llama"], window=64, stride=32)
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="code", window=64, stride=32).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    yield lm, store
    store.close()


def test_eval_with_a_temperature_head_equals_brute_force(store_and_lm) -> None:
    lm, store = store_and_lm
    policy = _head_policy(seed=7)
    saved = SavedPolicy.from_dict(
        SavedPolicy(policy, 1.5, 8, "m", "final").to_dict(), collection="c"
    )
    knn_lm = KnnLM(
        lm,
        store,
        k=8,
        temperature=saved.temperature,
        policy=saved.policy,
        search=SearchOptions(exact=True),
        window=64,
        stride=32,
    )
    text = lm.encode("def mul(a, b):\n    return a * b\nclass Stack:\n")
    (scored,) = list(knn_lm.score([text], full=True))
    f = scored.features
    temps = _reference_temperatures(policy, f, 1.5)  # [m] float64
    assert np.ptp(temps[np.isfinite(f.sq_distances[:, 0].numpy())]) > 0
    d2 = f.sq_distances.double().numpy()
    ids = f.token_ids.numpy()
    assert scored.lm.lm_log_probs is not None
    p_lm = scored.lm.lm_log_probs.double().exp().numpy()
    lam = scored.lmbda.double().numpy()
    for i in range(0, len(scored), max(len(scored) // 5, 1)):  # a few positions
        p_knn = knn_probs(d2[i : i + 1], ids[i : i + 1], lm.vocab_size, float(temps[i]))
        want = interpolated_log_prob(p_lm[i : i + 1], p_knn, lam[i : i + 1])[0]
        target = int(scored.lm.targets[i])
        assert float(scored.log_prob[i]) == pytest.approx(want[target], abs=1e-4)
        assert scored.log_probs is not None
        np.testing.assert_allclose(
            scored.log_probs[i].double().exp().numpy(), np.exp(want), atol=1e-5
        )
    # and the generation step gives the same distribution at the last position
    step = knn_lm.next_token_log_probs(scored.lm.lm_log_probs[-1:], scored.lm.keys[-1:])
    torch.testing.assert_close(step, scored.log_probs[-1:], atol=1e-5, rtol=1e-5)


# --- knnlm tune --save learned-t, then eval ---------------------------------------------------


def test_tune_saves_learned_t_and_eval_reproduces_its_test_perplexity(
    tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["llama"])
    _json_ok(knnlm.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    validation, test = tmp_path / "validation", tmp_path / "test"
    validation.mkdir()
    test.mkdir()
    # learned-t needs 512 validation tokens: the tune CLI tests' text, and it reworded
    texts = [*VALIDATION, *(t.replace("x", "left").replace("y", "right") for t in VALIDATION)]
    for i, text in enumerate(texts):
        (validation / f"{i}.txt").write_text(text)
    for i, text in enumerate(TEST):
        (test / f"{i}.txt").write_text(text)
    args = [*knnlm.model_args(), *knnlm.store_args(), "--top-k", "8", "--exact", "-q", "--json"]
    report = _json_ok(
        knnlm("tune", str(validation), "--test", str(test), "--save", "learned-t", *args)
    )
    assert report["saved"] == "learned-t"
    row = report["policies"]["learned-t"]
    assert "temperature_layers" in row["policy"]
    assert row["validation_perplexity"] <= report["policies"]["learned"]["validation_perplexity"]
    evaluated = _json_ok(knnlm("eval", str(test), *args))
    assert evaluated["policy_source"] == "tuned"
    assert evaluated["temperature"] == pytest.approx(row["temperature"])
    assert evaluated["knn_perplexity"] == pytest.approx(row["test_perplexity"], rel=1e-4)
    # without --learn-temperature (or --save learned-t) it is not fitted
    plain = _json_ok(knnlm("tune", str(validation), "--save", "none", *args))
    assert "learned-t" not in plain["policies"]
