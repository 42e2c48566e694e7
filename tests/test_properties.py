"""Property-based tests of the pure parts: kNN math, interpolation, lambda policies, the
retrieval gate, sliding windows and the settings.

Hypothesis draws the inputs a hand-written case would not think of (a temperature below
float32's smallest number, a row of NaN distances, a window of 2 with stride 1). Every
property runs a bounded, derandomized number of examples, so CI sees the same cases each run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from knn_store.gate import GATE_FEATURES, RetrievalGate
from knn_store.knn import interpolate, knn_log_probs, knn_target_log_probs, neighbour_log_weights
from knn_store.lambdas import (
    FEATURES,
    BucketLambda,
    FixedLambda,
    LambdaPolicy,
    LearnedLambda,
    QueryFeatures,
    policy_from_dict,
)
from knn_store.settings import MAX_TOP_K, KnnlmSettings
from knn_store.windows import PAD_MULTIPLE, by_padded_width, sliding_windows

BOUNDED = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(BOUNDED, max_examples=60)

# --- strategies ------------------------------------------------------------------------------

# Any finite T > 0: ordinary values, and the extremes that used to give NaN or wrong numbers.
temperatures = st.one_of(
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=0.0, max_value=1e308, exclude_min=True, allow_subnormal=True),
    st.sampled_from([5e-324, 1e-300, 1e-46, 1e-38, 1e38, 1e39, 1e300, 1.7e308]),
)
# Squared distances as a damaged or padded result may hold them.
distances = st.one_of(
    st.floats(min_value=0.0, max_value=1e4, width=32),
    st.just(0.0),
    st.floats(min_value=2.0**100, max_value=2.0**127, width=32),
    st.sampled_from([math.inf, math.nan]),
)


@st.composite
def neighbour_rows(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sq_distances float32 [b, k], token_ids int64 [b, k] with -1 = missing, vocab size)."""
    b = draw(st.integers(1, 5))
    k = draw(st.integers(1, 12))
    vocab = draw(st.integers(1, 20))
    d = draw(st.lists(distances, min_size=b * k, max_size=b * k))
    ids = draw(st.lists(st.integers(-1, vocab - 1), min_size=b * k, max_size=b * k))
    sq = torch.tensor(d, dtype=torch.float32).reshape(b, k)
    return sq, torch.tensor(ids, dtype=torch.int64).reshape(b, k), vocab


def _valid(sq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bool [b, k]: the neighbours that count (finite distance, a real token)."""
    return torch.isfinite(sq) & (ids >= 0)


# --- the kNN distribution --------------------------------------------------------------------


@BOUNDED
@given(rows=neighbour_rows(), temperature=temperatures)
def test_knn_rows_with_a_neighbour_sum_to_one_and_never_nan(
    rows: tuple[torch.Tensor, torch.Tensor, int], temperature: float
) -> None:
    sq, ids, vocab = rows
    log_p = knn_log_probs(sq, ids, vocab_size=vocab, temperature=temperature)  # [b, V]
    assert not torch.isnan(log_p).any()
    has = _valid(sq, ids).any(-1)  # [b]
    sums = log_p.exp().sum(-1).double()
    np.testing.assert_allclose(sums[has].numpy(), 1.0, atol=1e-5)
    assert torch.all(torch.isneginf(log_p[~has]))  # p_kNN = 0 where nothing was found


@BOUNDED
@given(rows=neighbour_rows(), temperature=temperatures, data=st.data())
def test_target_path_equals_gather_of_the_full_path(
    rows: tuple[torch.Tensor, torch.Tensor, int], temperature: float, data: st.DataObject
) -> None:
    sq, ids, vocab = rows
    targets = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=len(sq), max_size=len(sq)))
    )
    full = knn_log_probs(sq, ids, vocab_size=vocab, temperature=temperature)
    gathered = full.gather(1, targets[:, None])[:, 0]
    target = knn_target_log_probs(sq, ids, targets, temperature=temperature)
    assert not torch.isnan(target).any()
    # Compared as probabilities: the target path keeps tiny values the full path rounds to 0.
    np.testing.assert_allclose(target.exp().numpy(), gathered.exp().numpy(), atol=1e-5)
    voted = (_valid(sq, ids) & (ids == targets[:, None])).any(-1)
    assert torch.all(torch.isneginf(target[~voted]))
    assert torch.all(torch.isneginf(gathered[~voted]))


@BOUNDED
@given(rows=neighbour_rows(), temperature=temperatures, seed=st.integers(0, 2**16))
def test_full_distribution_ignores_the_order_of_neighbours(
    rows: tuple[torch.Tensor, torch.Tensor, int], temperature: float, seed: int
) -> None:
    sq, ids, vocab = rows
    perm = torch.randperm(sq.shape[1], generator=torch.Generator().manual_seed(seed))
    a = knn_log_probs(sq, ids, vocab_size=vocab, temperature=temperature).exp()
    b = knn_log_probs(sq[:, perm], ids[:, perm], vocab_size=vocab, temperature=temperature).exp()
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


@BOUNDED
@given(rows=neighbour_rows(), temperature=temperatures)
def test_a_nearer_neighbour_never_weighs_less(
    rows: tuple[torch.Tensor, torch.Tensor, int], temperature: float
) -> None:
    sq, _, _ = rows
    log_w = neighbour_log_weights(sq, temperature)  # [b, k]
    assert not torch.isnan(log_w).any()
    d = torch.nan_to_num(sq, nan=math.inf)
    nearer = d[:, :, None] < d[:, None, :]  # [b, k, k]: i strictly nearer than j
    assert torch.all((log_w[:, :, None] >= log_w[:, None, :] - 1e-6) | ~nearer)


def test_huge_temperatures_agree_and_tiny_ones_pick_the_nearest() -> None:
    """A huge T spreads weight evenly over the neighbours found; a T below float32's
    smallest number puts it all on the nearest (it used to give NaN, then wrong perplexity)."""
    sq = torch.tensor([[0.5, 2.0, 9.0, math.inf, math.inf]])
    ids = torch.tensor([[3, 4, 4, -1, -1]])
    for temperature in (1e6, 1e38, 1e300, 1.7e308):
        p = knn_log_probs(sq, ids, vocab_size=6, temperature=temperature).exp()[0]
        np.testing.assert_allclose(p[[3, 4]].numpy(), [1 / 3, 2 / 3], atol=1e-5)
    for temperature in (1e-30, 1e-46, 1e-300, 5e-324):
        p = knn_log_probs(sq, ids, vocab_size=6, temperature=temperature).exp()[0]
        assert p[3].item() == 1.0 and p.sum().item() == 1.0


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, -math.inf, math.nan])
def test_invalid_temperature_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        neighbour_log_weights(torch.zeros(1, 2), temperature)


# --- interpolation ---------------------------------------------------------------------------


@st.composite
def distributions(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM log-probs, kNN log-probs), float32 [b, V], each row normalised; kNN rows may
    hold zeros (tokens no neighbour voted for)."""
    b, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 16))
    logits = st.floats(-30, 30, width=32)
    lm = torch.tensor(draw(st.lists(logits, min_size=b * vocab, max_size=b * vocab)))
    knn = torch.tensor(draw(st.lists(logits, min_size=b * vocab, max_size=b * vocab)))
    zero = torch.tensor(draw(st.lists(st.booleans(), min_size=b * vocab, max_size=b * vocab)))
    knn = knn.masked_fill(zero, -math.inf).reshape(b, vocab)
    knn[:, 0] = knn[:, 0].nan_to_num(neginf=0.0)  # at least one token per row
    return lm.reshape(b, vocab).log_softmax(-1), knn.log_softmax(-1)


lambdas_01 = st.floats(0.0, 1.0)


@BOUNDED
@given(dists=distributions(), lmbda=lambdas_01)
def test_interpolation_stays_normalised(
    dists: tuple[torch.Tensor, torch.Tensor], lmbda: float
) -> None:
    lm, knn = dists
    mixed = interpolate(lm, knn, lmbda)
    assert not torch.isnan(mixed).any()
    np.testing.assert_allclose(mixed.exp().sum(-1).numpy(), 1.0, atol=1e-5)


@BOUNDED
@given(dists=distributions(), data=st.data())
def test_per_query_lambda_stays_normalised(
    dists: tuple[torch.Tensor, torch.Tensor], data: st.DataObject
) -> None:
    lm, knn = dists
    lmbda = torch.tensor(data.draw(st.lists(lambdas_01, min_size=len(lm), max_size=len(lm))))
    mixed = interpolate(lm, knn, lmbda)
    np.testing.assert_allclose(mixed.exp().sum(-1).numpy(), 1.0, atol=1e-5)
    for row in range(len(lm)):  # each row mixes with its own lambda
        alone = interpolate(lm[row : row + 1], knn[row : row + 1], float(lmbda[row]))
        np.testing.assert_allclose(mixed[row].numpy(), alone[0].numpy(), atol=1e-6)


@BOUNDED
@given(dists=distributions())
def test_lambda_zero_is_the_lm_exactly_and_one_is_the_knn(
    dists: tuple[torch.Tensor, torch.Tensor],
) -> None:
    lm, knn = dists
    assert torch.equal(interpolate(lm, knn, 0.0), lm)
    assert torch.equal(interpolate(lm, knn, 1.0), knn)


@pytest.mark.parametrize("lmbda", [-1e-9, 1.0000001, math.nan, math.inf])
def test_lambda_outside_the_unit_interval_is_refused(lmbda: float) -> None:
    with pytest.raises(ValueError, match="lmbda"):
        interpolate(torch.zeros(1, 2), torch.zeros(1, 2), lmbda)


# --- lambda policies -------------------------------------------------------------------------


@st.composite
def query_features(draw: st.DrawFn) -> QueryFeatures:
    """Features of b queries as retrieval and the LM give them: ascending distances padded
    with +inf and -1 (some rows empty), entropies, top probabilities and cosines."""
    b, k = draw(st.integers(1, 6)), draw(st.integers(1, 20))
    found = draw(st.lists(st.integers(0, k), min_size=b, max_size=b))
    d = torch.tensor(draw(st.lists(st.floats(0, 1e6, width=32), min_size=b * k, max_size=b * k)))
    sq = d.reshape(b, k).sort(-1).values
    ids = torch.tensor(draw(st.lists(st.integers(0, 50), min_size=b * k, max_size=b * k)))
    ids = ids.reshape(b, k)
    missing = torch.arange(k)[None, :] >= torch.tensor(found)[:, None]  # [b, k]
    row = st.lists(st.floats(0, 12, width=32), min_size=b, max_size=b)
    top = st.lists(st.floats(-12, 0, width=32), min_size=b, max_size=b)
    cos = st.lists(st.floats(-1, 1, width=32), min_size=b, max_size=b)
    return QueryFeatures(
        sq_distances=sq.masked_fill(missing, math.inf),
        token_ids=ids.masked_fill(missing, -1),
        lm_entropy=torch.tensor(draw(row)),
        lm_max_log_prob=torch.tensor(draw(top)),
        cosine=torch.tensor(draw(cos)),
    )


finite_weights = st.floats(-10, 10, width=32)


@st.composite
def policies(draw: st.DrawFn) -> LambdaPolicy:
    kind = draw(st.sampled_from(["fixed", "buckets", "learned"]))
    if kind == "fixed":
        return FixedLambda(draw(lambdas_01))
    if kind == "buckets":
        feature = draw(st.sampled_from(["d_min", "cosine"]))
        n = draw(st.integers(1, 8))
        bound = 1.0 if feature == "cosine" else 1e6
        edges = sorted(draw(st.lists(st.floats(-bound, bound), min_size=n - 1, max_size=n - 1)))
        lambdas = draw(st.lists(lambdas_01, min_size=n, max_size=n))
        return BucketLambda(feature, edges, lambdas)
    names = draw(st.lists(st.sampled_from(FEATURES), min_size=1, max_size=5, unique=True))
    f = len(names)
    mean = draw(st.lists(st.floats(-10, 10), min_size=f, max_size=f))
    std = draw(st.lists(st.floats(1e-6, 10), min_size=f, max_size=f))
    sizes = [f, *draw(st.lists(st.integers(1, 6), max_size=2)), 1]
    layers = []
    for n_in, n_out in itertools.pairwise(sizes):
        weight = [
            draw(st.lists(finite_weights, min_size=n_in, max_size=n_in)) for _ in range(n_out)
        ]
        layers.append((weight, draw(st.lists(finite_weights, min_size=n_out, max_size=n_out))))
    return LearnedLambda(names, mean, std, layers)


@BOUNDED
@given(policy=policies(), features=query_features())
def test_policies_give_lambdas_in_the_unit_interval_and_zero_without_neighbours(
    policy: LambdaPolicy, features: QueryFeatures
) -> None:
    lmbda = policy(features)
    assert lmbda.shape == (len(features.sq_distances),)
    assert lmbda.dtype == torch.float32
    assert torch.all((lmbda >= 0) & (lmbda <= 1)), lmbda  # NaN fails both
    assert torch.all(lmbda[~features.has_neighbour] == 0)


@BOUNDED
@given(policy=policies(), features=query_features())
def test_policies_survive_a_json_round_trip(policy: LambdaPolicy, features: QueryFeatures) -> None:
    saved = json.loads(json.dumps(policy.to_dict()))  # as policy.json keeps it
    again = policy_from_dict(saved)
    assert type(again) is type(policy)
    assert again.to_dict() == policy.to_dict()
    assert torch.equal(again(features), policy(features))


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "fixed", "lambda": 1.5},
        {"kind": "fixed", "lambda": math.nan},
        {"kind": "buckets", "feature": "d_min", "edges": [2.0, 1.0], "lambdas": [0, 0, 0]},
        {"kind": "buckets", "feature": "d_min", "edges": [1.0], "lambdas": [0.1]},
        {"kind": "buckets", "feature": "entropy", "edges": [], "lambdas": [0.1]},
        {"kind": "learned", "features": ["d_min"], "mean": [0], "std": [1], "layers": []},
        {  # a weight matrix that does not fit the features: used to fail mid-eval
            "kind": "learned",
            "features": ["d_min"],
            "mean": [0],
            "std": [1],
            "layers": [[[[1.0, 2.0]], [0.0]]],
        },
        {  # two outputs
            "kind": "learned",
            "features": ["d_min"],
            "mean": [0],
            "std": [1],
            "layers": [[[[1.0], [2.0]], [0.0, 0.0]]],
        },
        {"kind": "mystery"},
    ],
)
def test_invalid_policy_records_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        policy_from_dict(data)


# --- the retrieval gate ----------------------------------------------------------------------


@st.composite
def gates(draw: st.DrawFn) -> RetrievalGate:
    n = len(GATE_FEATURES)
    return RetrievalGate(
        draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n)),
        draw(st.lists(st.floats(1e-6, 10), min_size=n, max_size=n)),
        draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n)),
        draw(st.floats(-10, 10)),
        threshold=draw(lambdas_01),
    )


lm_summaries = st.integers(1, 30).flatmap(
    lambda b: st.tuples(
        st.lists(st.floats(0, 12, width=32), min_size=b, max_size=b),
        st.lists(st.floats(-12, 0, width=32), min_size=b, max_size=b),
    )
)


@BOUNDED
@given(gate=gates(), summary=lm_summaries)
def test_gate_survives_a_json_round_trip(
    gate: RetrievalGate, summary: tuple[list[float], list[float]]
) -> None:
    entropy, top = (torch.tensor(x) for x in summary)
    again = RetrievalGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert again.to_dict() == gate.to_dict()
    assert torch.equal(again(entropy, top), gate(entropy, top))


@BOUNDED
@given(gate=gates(), summary=lm_summaries, t1=lambdas_01, t2=lambdas_01)
def test_a_higher_gate_threshold_searches_a_subset(
    gate: RetrievalGate, summary: tuple[list[float], list[float]], t1: float, t2: float
) -> None:
    entropy, top = (torch.tensor(x) for x in summary)
    low, high = min(t1, t2), max(t1, t2)
    searched_low = gate.with_threshold(low)(entropy, top)
    searched_high = gate.with_threshold(high)(entropy, top)
    assert torch.all(searched_low | ~searched_high)  # high => low
    assert torch.all(gate.with_threshold(0.0)(entropy, top))  # 0 searches everywhere
    scores = gate.scores(entropy, top)
    assert torch.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.5},
        {"threshold": math.nan},
        {"std": [1.0, 0.0]},
        {"std": [1.0, -2.0]},
        {"mean": [0.0]},
    ],
)
def test_invalid_gates_are_refused(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "mean": [0.0, 0.0],
        "std": [1.0, 1.0],
        "weights": [1.0, 1.0],
        "bias": 0.0,
        "threshold": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        RetrievalGate(
            args["mean"], args["std"], args["weights"], args["bias"], threshold=args["threshold"]
        )


# --- sliding windows -------------------------------------------------------------------------

window_args = st.integers(2, 64).flatmap(
    lambda w: st.tuples(st.integers(0, 400), st.just(w), st.integers(1, w))
)


@BOUNDED
@given(args=window_args)
def test_windows_score_every_position_once_with_enough_context(
    args: tuple[int, int, int],
) -> None:
    n, window, stride = args
    windows = list(sliding_windows(n, window=window, stride=stride))
    scored = np.concatenate([w.positions for w in windows]) if windows else np.array([], int)
    np.testing.assert_array_equal(scored, np.arange(max(n - 1, 0)))  # once each, in order
    for i, w in enumerate(windows):
        assert 0 <= w.start <= w.first and w.end <= n
        assert w.end - w.start <= window
        if len(w.positions):
            assert w.positions[-1] + 1 < w.end  # the window holds the token it predicts
        if i > 0:  # past the first window: at least W - S tokens seen at each position
            assert np.all(w.positions - w.start + 1 >= window - stride)
    # no wasted windows: each new one scores min(S, W - 1) new positions (the last maybe less)
    assert len(windows) <= (0 if n < 2 else math.ceil((n - 1) / min(stride, window - 1)) + 1)


@BOUNDED
@given(args=window_args)
def test_padded_widths_depend_on_the_window_alone(args: tuple[int, int, int]) -> None:
    n, window, stride = args
    windows = list(sliding_windows(n, window=window, stride=stride))
    groups = by_padded_width(windows, cap=window)
    assert sorted(i for _, members in groups for i in members) == list(range(len(windows)))
    for width, members in groups:
        for i in members:  # the same width alone as in any batch, never past the window
            assert by_padded_width([windows[i]], cap=window) == [(width, [0])]
            assert windows[i].end - windows[i].start <= width <= window
            assert width % PAD_MULTIPLE == 0 or width == window


@pytest.mark.parametrize(("window", "stride"), [(1, 1), (0, 1), (4, 0), (4, 5), (4, -1)])
def test_invalid_windows_are_refused(window: int, stride: int) -> None:
    with pytest.raises(ValueError):
        list(sliding_windows(10, window=window, stride=stride))


# --- settings --------------------------------------------------------------------------------


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly these KNNLM_* variables set, for the duration (hypothesis and monkeypatch's
    function-scoped fixture do not mix)."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("KNNLM_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _assert_sane(made: KnnlmSettings) -> None:
    """What the rest of knnlm relies on once settings exist."""
    assert 1 <= made.top_k <= MAX_TOP_K
    assert made.lmbda is None or 0.0 <= made.lmbda <= 1.0  # NaN fails
    assert made.temperature is None or 0.0 < made.temperature < math.inf
    assert made.window is None or made.window >= 2
    assert made.stride is None or made.window is None or 1 <= made.stride <= made.window
    assert made.domain.strip() and made.domain.isprintable()
    assert made.collection.strip() and "/" not in made.collection
    assert made.backend != "qdrant" or made.url


FIELDS = sorted(KnnlmSettings.model_fields)
odd_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e309", "0x10", "1_000", "\n", "a/b"]),
)
any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@BOUNDED
@given(values=st.dictionaries(st.sampled_from(FIELDS), any_value, max_size=4))
def test_any_keyword_value_is_accepted_or_a_validation_error(values: dict[str, Any]) -> None:
    with _environment({}):
        try:
            made = KnnlmSettings(**values)
        except ValidationError as exc:
            _assert_blames_what_was_given(exc, set(values))
            return
    _assert_sane(made)


def _assert_blames_what_was_given(exc: ValidationError, given: set[str]) -> None:
    """Every error names a field that was given: by its location, or (a rule between
    fields) by its flag in the message."""
    aliases = {"knnlm_lambda": "lmbda"}
    for error in exc.errors():
        if error["loc"]:
            field = str(error["loc"][0]).lower().removeprefix("knnlm_")
            field = aliases.get(f"knnlm_{field}", field)
            assert field in given or aliases.get(str(error["loc"][0])) in given, error
        else:
            flags = {"--" + name.replace("_", "-") for name in given} | given
            assert any(flag in error["msg"] for flag in flags), error


env_names = st.sampled_from(["KNNLM_" + ("LAMBDA" if f == "lmbda" else f.upper()) for f in FIELDS])
env_text = odd_text.filter(lambda s: "\x00" not in s)


@BOUNDED
@given(values=st.dictionaries(env_names, env_text, max_size=4))
def test_any_environment_value_is_accepted_or_a_validation_error(values: dict[str, str]) -> None:
    with _environment(values):
        try:
            made = KnnlmSettings()
        except ValidationError as exc:
            given = {n.removeprefix("KNNLM_").lower() for n in values}
            _assert_blames_what_was_given(exc, {"lmbda" if g == "lambda" else g for g in given})
            return
    _assert_sane(made)


names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
# (field, environment variable, strategy of valid values written as the environment has them)
VALID = [
    ("top_k", "KNNLM_TOP_K", st.integers(1, MAX_TOP_K).map(str)),
    ("lmbda", "KNNLM_LAMBDA", lambdas_01.map(repr)),
    ("temperature", "KNNLM_TEMPERATURE", st.floats(1e-300, 1e300).map(repr)),
    ("window", "KNNLM_WINDOW", st.integers(2, 4096).map(str)),
    ("batch_size", "KNNLM_BATCH_SIZE", st.integers(1, 1024).map(str)),
    ("collection", "KNNLM_COLLECTION", names),
    ("domain", "KNNLM_DOMAIN", names),
    ("exact", "KNNLM_EXACT", st.sampled_from(["true", "false", "1", "0", "yes", "off"])),
    ("gate", "KNNLM_GATE", st.sampled_from(["true", "false"])),
    ("key_type", "KNNLM_KEY_TYPE", st.sampled_from(["final", "ffn_input"])),
    ("quantization", "KNNLM_QUANTIZATION", st.sampled_from(["none", "int8", "turbo1.5"])),
    ("vector_datatype", "KNNLM_VECTOR_DATATYPE", st.sampled_from(["float32", "float16"])),
    ("hnsw_ef", "KNNLM_HNSW_EF", st.integers(1, 1_000_000).map(str)),
    ("oversampling", "KNNLM_OVERSAMPLING", st.floats(1.0, 100.0).map(repr)),
    ("upsert_batch", "KNNLM_UPSERT_BATCH", st.integers(1, 65_536).map(str)),
    ("data_dir", "KNNLM_DATA_DIR", names.map(lambda s: "/tmp/" + s)),
]


@FEW
@given(data=st.data())
def test_valid_environment_and_keywords_agree(data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(VALID), max_size=5, unique_by=lambda v: v[0]))
    env = {variable: data.draw(values) for _, variable, values in chosen}
    kwargs = {field: env[variable] for field, variable, _ in chosen}
    with _environment(env):
        from_env = KnnlmSettings().model_dump()
    with _environment({}):
        from_kwargs = KnnlmSettings(**kwargs).model_dump()
    assert from_env == from_kwargs


def test_a_collection_name_with_a_trailing_newline_is_refused() -> None:
    with _environment({}), pytest.raises(ValidationError):
        KnnlmSettings(collection="abc\n")
