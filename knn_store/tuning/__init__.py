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

The package follows those steps: ``evidence`` (``collect``), ``sweeps`` (each policy's fit),
``fit_all`` (``tune``: every policy), ``gate_fit`` (the retrieval gate), ``rules`` (the
refusals) and ``levers`` (the document cache and the pointer threshold). Import from here.
"""

from knn_store.tuning.evidence import LAMBDA_GRID, TuningData, collect
from knn_store.tuning.fit_all import TuneResult, tune
from knn_store.tuning.gate_fit import GateFit, fit_gate, gated_nll, retrieval_gains
from knn_store.tuning.levers import (
    CACHE_TEMPERATURE_FACTORS,
    CACHE_WEIGHTS,
    POINTER_THRESHOLDS,
    LeverFit,
    fit_levers,
)
from knn_store.tuning.rules import (
    HELD_COSINE,
    HOLDOUT_FOLDS,
    LARGE_TEST_CHANGE,
    MAX_HELD_SHARE,
    MAX_NEAR_SHARE,
    MIN_FIXED_TOKENS,
    MIN_LEARNED_T_TOKENS,
    MIN_LEARNED_TOKENS,
    MIN_TOKENS_PER_BUCKET,
    NEAR_COSINE,
    NOISE_ERRORS,
    check_held_out,
    check_not_held,
    check_saveable,
    check_tuning_size,
    fold_rows,
    gain,
    held_out_gains,
    held_share,
    near_share,
    tokens_needed,
)
from knn_store.tuning.sweeps import (
    Tuned,
    bucket_edges,
    fit_buckets,
    fit_fixed,
    fit_learned,
    fit_learned_temperature,
    sweep_temperatures,
)

__all__ = [
    "CACHE_TEMPERATURE_FACTORS",
    "CACHE_WEIGHTS",
    "HELD_COSINE",
    "HOLDOUT_FOLDS",
    "LAMBDA_GRID",
    "LARGE_TEST_CHANGE",
    "MAX_HELD_SHARE",
    "MAX_NEAR_SHARE",
    "MIN_FIXED_TOKENS",
    "MIN_LEARNED_TOKENS",
    "MIN_LEARNED_T_TOKENS",
    "MIN_TOKENS_PER_BUCKET",
    "NEAR_COSINE",
    "NOISE_ERRORS",
    "POINTER_THRESHOLDS",
    "GateFit",
    "LeverFit",
    "TuneResult",
    "Tuned",
    "TuningData",
    "bucket_edges",
    "check_held_out",
    "check_not_held",
    "check_saveable",
    "check_tuning_size",
    "collect",
    "fit_buckets",
    "fit_fixed",
    "fit_gate",
    "fit_learned",
    "fit_learned_temperature",
    "fit_levers",
    "fold_rows",
    "gain",
    "gated_nll",
    "held_out_gains",
    "held_share",
    "near_share",
    "retrieval_gains",
    "sweep_temperatures",
    "tokens_needed",
    "tune",
]
