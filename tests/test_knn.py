"""The kNN distribution and interpolation against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_store.knn import (
    interpolate,
    knn_log_probs,
    knn_target_log_probs,
    neighbour_log_weights,
)
from knn_store.lambdas import (
    FEATURES,
    BucketLambda,
    FixedLambda,
    LambdaPolicy,
    LearnedLambda,
    QueryFeatures,
)
from tests.reference import interpolated_log_prob, knn_probs, log_softmax

V = 50


def _random_neighbours(rng: np.random.Generator, b: int, k: int, missing: int = 0):
    d2 = np.sort(rng.gamma(2.0, 3.0, size=(b, k)), axis=1).astype(np.float32)
    ids = rng.integers(0, V, size=(b, k))
    ids[:, :3] = rng.integers(0, 4, size=(b, 3))  # repeated values must add up
    if missing:
        d2[:, -missing:] = np.inf
        ids[:, -missing:] = -1
    return d2, ids


@pytest.mark.parametrize("temperature", [0.5, 1.0, 7.0])
@pytest.mark.parametrize("missing", [0, 5])
def test_knn_log_probs_match_reference(temperature: float, missing: int) -> None:
    rng = np.random.default_rng(1)
    d2, ids = _random_neighbours(rng, b=6, k=16, missing=missing)
    got = knn_log_probs(
        torch.from_numpy(d2), torch.from_numpy(ids), vocab_size=V, temperature=temperature
    )
    want = knn_probs(d2.astype(np.float64), ids, V, temperature)
    np.testing.assert_allclose(got.exp().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(got.exp().sum(-1).numpy(), 1.0, atol=1e-5)


def test_target_log_probs_equal_gathered_full_distribution() -> None:
    rng = np.random.default_rng(2)
    d2, ids = _random_neighbours(rng, b=32, k=8, missing=2)
    targets = np.concatenate([ids[:16, 0], rng.integers(0, V, size=16)])  # hits and misses
    d2_t, ids_t, tg = torch.from_numpy(d2), torch.from_numpy(ids), torch.from_numpy(targets)
    full = knn_log_probs(d2_t, ids_t, vocab_size=V, temperature=2.0).gather(1, tg[:, None])[:, 0]
    target = knn_target_log_probs(d2_t, ids_t, tg, temperature=2.0)
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(target))
    np.testing.assert_allclose(target[finite].numpy(), full[finite].numpy(), atol=1e-5)


def test_no_neighbours_gives_zero_probability_not_nan() -> None:
    d2 = torch.full((2, 4), float("inf"))
    ids = torch.full((2, 4), -1)
    lp = knn_log_probs(d2, ids, vocab_size=V, temperature=1.0)
    assert torch.isneginf(lp).all()
    assert torch.isneginf(
        knn_target_log_probs(d2, ids, torch.tensor([1, 2]), temperature=1.0)
    ).all()
    assert not torch.isnan(neighbour_log_weights(d2, 1.0)).any()
    lmbda = FixedLambda(0.3)(QueryFeatures(d2, ids, torch.zeros(2), torch.zeros(2)))
    assert torch.equal(lmbda, torch.zeros(2))  # the LM keeps its own distribution
    lm = torch.log_softmax(torch.randn(2, V), -1)
    torch.testing.assert_close(interpolate(lm, lp, lmbda), lm)


@pytest.mark.parametrize("lmbda", [0.0, 0.25, 1.0])
def test_interpolation_matches_reference(lmbda: float) -> None:
    rng = np.random.default_rng(3)
    d2, ids = _random_neighbours(rng, b=5, k=12, missing=3)
    lm = log_softmax(rng.normal(size=(5, V)))
    knn = knn_log_probs(torch.from_numpy(d2), torch.from_numpy(ids), vocab_size=V, temperature=1.0)
    got = interpolate(torch.from_numpy(lm).float(), knn, lmbda)
    want = interpolated_log_prob(
        np.exp(lm), knn_probs(d2.astype(np.float64), ids, V, 1.0), np.full(5, lmbda)
    )
    finite = np.isfinite(want)
    assert not torch.isnan(got).any()
    np.testing.assert_array_equal(np.isfinite(got.numpy()), finite)
    np.testing.assert_allclose(got.numpy()[finite], want[finite], atol=1e-4)


def test_per_query_lambda_broadcasts() -> None:
    lm = torch.log_softmax(torch.randn(3, V), -1)
    knn = torch.log_softmax(torch.randn(3, V), -1)
    lmbda = torch.tensor([0.0, 0.5, 1.0])
    out = interpolate(lm, knn, lmbda)
    torch.testing.assert_close(out[0], lm[0])
    torch.testing.assert_close(out[2], knn[2])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_lambda_out_of_range_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="lmbda"):
        FixedLambda(bad)
    with pytest.raises(ValueError, match="lmbda"):
        interpolate(torch.zeros(1, 2), torch.zeros(1, 2), bad)


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature"):
        neighbour_log_weights(torch.zeros(1, 2), 0.0)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        knn_log_probs(
            torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), vocab_size=V, temperature=1.0
        )


POLICIES = [
    FixedLambda(0.3),
    BucketLambda("d_min", [5.0, 20.0], [0.9, 0.5, 0.1]),
    BucketLambda("cosine", [0.5], [0.2, 0.7]),
    LearnedLambda(list(FEATURES), [0.0] * 5, [1.0] * 5, [([[0.3, -0.2, 0.1, 0.5, -0.4]], [0.1])]),
]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_full_vocabulary_path_agrees_with_target_path(tmp_path, policy: LambdaPolicy) -> None:
    """What generation uses ([n, V]) gives eval's numbers at the target tokens, per policy."""
    from knn_store import CollectionMeta, PointBatch
    from knn_store.knn_lm import KnnLM, lm_summary
    from knn_store.store.config import SearchOptions
    from knn_store.store.edge import EdgeStore
    from knn_store.store.point_ids import document_hash, make_point_ids

    rng = np.random.default_rng(4)
    keys = rng.standard_normal((200, 8)).astype(np.float32)
    tokens = rng.integers(0, V, 200)
    store = EdgeStore(tmp_path / "c")
    store.ensure_collection(
        CollectionMeta(
            model="m", model_fingerprint="f", key_type="final", dim=8, vocab_size=V, tokenizer="t"
        )
    )
    ids = make_point_ids(document_hash("d", "t"), np.arange(200), tokens)
    store.upsert(PointBatch(ids=ids, keys=keys, payloads=[{} for _ in ids]))
    knn_lm = KnnLM(
        None,  # type: ignore[arg-type]  # this test feeds keys and LM scores itself
        store,
        k=16,
        temperature=2.0,
        policy=policy,
        search=SearchOptions(exact=True),
        window=8,
        stride=4,
    )
    queries = torch.from_numpy(keys[:10] + 0.1)
    neighbours = knn_lm.neighbours(queries)
    assert (neighbours.cosine is not None) == policy.needs_cosine
    lm = torch.log_softmax(torch.randn(10, V), -1)
    targets = torch.from_numpy(tokens[:10])
    full = knn_lm.next_token_log_probs(lm, queries)  # [10, V]
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(10))
    entropy, max_log_prob = lm_summary(lm)
    features = knn_lm.features(neighbours, lm_entropy=entropy, lm_max_log_prob=max_log_prob)
    knn = knn_target_log_probs(features.sq_distances, features.token_ids, targets, temperature=2.0)
    via_target = interpolate(lm.gather(1, targets[:, None])[:, 0], knn, policy(features))
    torch.testing.assert_close(full.gather(1, targets[:, None])[:, 0], via_target)
    store.close()
