"""The rules by which tune refuses: validation text too small to fit on with a part held
out, text the datastore holds or nearly repeats, and policies that do not beat the base LM
on text they were not fitted on."""

from __future__ import annotations

import itertools
import math

import torch

from knn_store.errors import ConfigError, CorpusError
from knn_store.gate import RetrievalGate
from knn_store.tuning.evidence import TuningData
from knn_store.tuning.fit_all import tune
from knn_store.tuning.gate_fit import retrieval_gains
from knn_store.tuning.sweeps import Tuned

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
