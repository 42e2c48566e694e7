"""Tuning a collection, start to finish: what ``knnlm tune`` and the benchmarks run.

Collect the evidence (one LM pass and one search per validation token), refuse text that
cannot say how retrieval does on other text, fit every policy, fit the retrieval gate and
the levers for the one to save, check that it beats the base LM on validation text it was
not fitted on, then save it with the collection. The math lives in ``knn_store.tuning``;
this module is the order of the steps and the rules between them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from knn_store.errors import ConfigError, CorpusError
from knn_store.progress import Progress, no_progress

if TYPE_CHECKING:  # the CLI imports this module for its choices: torch loads on use
    import numpy as np

    from knn_store.knn_lm import KnnLM
    from knn_store.settings import KnnlmSettings
    from knn_store.tuning import LeverFit, TuneResult, TuningData

POLICY_CHOICES = ("fixed", "buckets", "cosine-buckets", "learned", "learned-t")


@dataclass(frozen=True)
class TuneOptions:
    """What to fit and save (the flags of ``knnlm tune``).

    Args:
        save: the policy to save (one of ``POLICY_CHOICES``), or "none" to only report.
        buckets: equal-population buckets of the adaptive policies.
        learn_temperature: also fit ``learned-t`` (implied by ``save="learned-t"``).
        gate_max_cost: the retrieval gate may raise the validation perplexity by this many
            percent; 0 fits no gate.
        fit_levers: also fit the document cache and (on a linked collection) the pointer
            threshold for the saved policy.
        pointer_budget: the pointer threshold may raise the perplexity by this many percent.
        force: save even where a rule refuses (not where the text is too small to fit
            on); the saved record then names the rules overridden.
    """

    save: str = "buckets"
    buckets: int = 64
    learn_temperature: bool = False
    gate_max_cost: float = 0.2
    fit_levers: bool = False
    pointer_budget: float = 0.5
    force: bool = False

    def __post_init__(self) -> None:
        if self.save not in (*POLICY_CHOICES, "none"):
            raise ConfigError(f"unknown policy {self.save!r}: one of {', '.join(POLICY_CHOICES)}")
        for name in ("gate_max_cost", "pointer_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite percentage >= 0, got {value}")
        if self.fit_levers and self.save == "none":
            raise ConfigError("fitting levers is for the saved policy: choose a policy to save")


@dataclass
class TuneOutcome:
    """What a tuning run found: every fit, the report ``knnlm tune --json`` prints, and
    lines to tell the user (what was not fitted, and why)."""

    result: TuneResult
    summary: dict[str, Any]
    key_type: str
    notes: list[str] = field(default_factory=list)


def tune_collection(
    settings: KnnlmSettings,
    validation_texts: Sequence[str],
    test_texts: Sequence[str] = (),
    *,
    search_domains: Sequence[str] = (),
    options: TuneOptions | None = None,
    on_progress: Progress = no_progress,
) -> TuneOutcome:
    """Fit T, the lambda policies, the gate and (``options.fit_levers``) the levers on
    ``validation_texts`` for ``settings.collection``, report them on ``test_texts`` too,
    and save ``options.save`` with the collection.

    Refuses (``CorpusError`` / ``ConfigError``, nothing saved) validation text too small
    to fit the policy with a fold held out, text the datastore holds or nearly repeats, a
    policy no better than the base LM on held-out validation folds (or within noise on
    validation while it moves the test perplexity past 5%), and levers that make the
    held-out part worse; ``options.force`` saves anyway, and says so in the record.
    """
    from knn_store import open_session
    from knn_store.tuning import check_tuning_size, collect

    options = options or TuneOptions()
    shared = set(validation_texts) & set(test_texts)
    if shared:
        raise ConfigError(
            f"{len(shared)} documents are both in the validation text and in the test text "
            "(--test); "
            "tuning and reporting on the same text overstates the gain"
        )
    # Tuning sets T and lambda itself, and must search everywhere to fit the gate; the
    # evidence is the plain kNN-LM's, so levers tuned before (or in the environment) are off.
    off = {"pointer_min": 0, "cache_weight": 0.0, "cache_temperature": None}
    settings = settings.model_copy(
        update={"lmbda": None, "temperature": None, "gate": False, **off}
    )
    with open_session(settings, search_domains=search_domains) as session:
        knn_lm = session.knn_lm
        started = time.perf_counter()
        sequences = session.encode(validation_texts)
        tokens = sum(max(len(s) - 1, 0) for s in sequences)  # each token after the first
        check_tuning_size(tokens, options.save, buckets=options.buckets, held_out=True)
        validation = collect(knn_lm, sequences, on_progress=on_progress)
        test = (
            collect(knn_lm, session.encode(test_texts), on_progress=on_progress)
            if test_texts
            else None
        )
        outcome = tune_evidence(
            knn_lm,
            validation,
            test,
            options=options,
            sequences=sequences,
            retrieve_seconds=time.perf_counter() - started,
        )
    outcome.summary.update(collection=settings.collection)
    return outcome


def tune_evidence(
    knn_lm: KnnLM,
    validation: TuningData,
    test: TuningData | None = None,
    *,
    options: TuneOptions | None = None,
    sequences: Sequence[np.ndarray] = (),
    retrieve_seconds: float = 0.0,
) -> TuneOutcome:
    """``tune_collection`` from evidence already collected (``tuning.collect``, or a
    benchmark's exact neighbours): the refusal rules, every fit, and the save with
    ``knn_lm``'s store, k and domains. ``sequences`` are the validation tokens, needed only
    to fit the levers."""
    from knn_store.tuning import check_not_held, tune

    options = options or TuneOptions()
    if options.fit_levers and not sequences:
        raise ValueError("fitting the levers needs the validation token sequences")
    forced: list[str] = []  # what each rule refused, where options.force saves anyway
    _rule(check_not_held, validation, force=options.force, overridden=forced)
    result = tune(
        validation,
        test,
        buckets=options.buckets,
        learn_temperature=options.learn_temperature or options.save == "learned-t",
    )
    summary = _summary(result, retrieve_seconds)
    outcome = TuneOutcome(result, summary, key_type=knn_lm.lm.key_type)
    if options.save != "none":
        _fit_and_save(knn_lm, list(sequences), validation, test, result, options, outcome, forced)
    if forced:
        summary["forced"] = forced
    summary.update(
        saved=None if options.save == "none" else options.save,
        domains=list(knn_lm.filter.domains),
    )
    return outcome


def _rule(check: Any, *args: Any, force: bool, overridden: list[str], **kwargs: Any) -> Any:
    """Run a refusal rule; with ``force``, note what it refused instead of raising."""
    try:
        return check(*args, **kwargs)
    except (ConfigError, CorpusError) as exc:
        if not force:
            raise
        overridden.append(str(exc))
        return None


def _fit_and_save(
    knn_lm: KnnLM,
    sequences: list[np.ndarray],
    validation: TuningData,
    test: TuningData | None,
    result: TuneResult,
    options: TuneOptions,
    outcome: TuneOutcome,
    forced: list[str],
) -> None:
    """Fit the gate and the levers for the policy to save, apply the rules, and save it
    (the record lists in ``report["forced"]`` the refusals ``options.force`` overrode)."""
    from knn_store.saved_policy import SavedPolicy
    from knn_store.tuning import HOLDOUT_FOLDS, check_held_out, check_saveable, fit_gate

    store, summary = knn_lm.store, outcome.summary
    kind = options.save
    chosen = result.policies[kind]
    gate = None
    if options.gate_max_cost > 0:
        gate = fit_gate(validation, chosen, max_cost=options.gate_max_cost / 100, test=test)
        summary["gate"] = _gate_summary(gate, result, kind)
    gate_rule = None if gate is None else gate.gate
    _rule(
        check_saveable,
        validation,
        chosen,
        gate=gate_rule,
        test=test,
        force=options.force,
        overridden=forced,
    )
    held_out = _rule(
        check_held_out,
        validation,
        kind,
        buckets=options.buckets,
        gate=gate_rule,
        force=options.force,
        overridden=forced,
    )
    summary["held_out"] = {
        "folds": HOLDOUT_FOLDS,
        "change_percent": None if held_out is None else 100 * held_out,
    }
    meta = store.meta
    assert meta is not None
    levers = None
    if options.fit_levers:
        if not meta.successors:
            outcome.notes.append(
                f"pointer threshold not fitted: collection {store.name!r} has no "
                "successor links; run `knnlm rebuild --successors` to fit it"
            )
        tuned = knn_lm.with_options(
            policy=chosen.policy, temperature=chosen.temperature, gate=gate_rule
        )
        levers = _fit_levers_held_out(
            tuned, sequences, options, linked=meta.successors, forced=forced, summary=summary
        )
    report = {"name": kind, **summary["policies"][kind]}
    if forced:
        report["forced"] = list(forced)
    saved = SavedPolicy(
        policy=chosen.policy,
        temperature=chosen.temperature,
        k=knn_lm.k,
        model_fingerprint=meta.model_fingerprint,
        key_type=meta.key_type,
        gate=gate_rule,
        domains=knn_lm.filter.domains,
        report=report,
        pointer_min=0 if levers is None else levers.pointer_min,
        cache_weight=0.0 if levers is None else levers.cache_weight,
        cache_temperature=None if levers is None else levers.cache_temperature,
    )
    store.save_policy(saved.to_dict())


def split_held_out(
    sequences: Sequence[np.ndarray], folds: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The token sequences cut where the last 1/``folds`` of their scored positions
    begins: (the rest, the last part). The sequence holding the cut is split with one
    token of overlap, so each position is scored in exactly one part.

    >>> import numpy as np
    >>> fit, held = split_held_out([np.arange(5), np.arange(10, 15)], 4)
    >>> [s.tolist() for s in fit], [s.tolist() for s in held]
    ([[0, 1, 2, 3, 4], [10, 11, 12]], [[12, 13, 14]])
    """
    lengths = [max(len(s) - 1, 0) for s in sequences]
    cut = sum(lengths) - sum(lengths) // folds  # scored positions before the held-out part
    fit: list[np.ndarray] = []
    held: list[np.ndarray] = []
    seen = 0
    for seq, n in zip(sequences, lengths, strict=True):
        if seen + n <= cut:
            fit.append(seq)
        elif seen >= cut:
            held.append(seq)
        else:
            at = cut - seen  # positions 1..at stay with the fit part
            fit.append(seq[: at + 1])
            held.append(seq[at:])
        seen += n
    return fit, held


def _fit_levers_held_out(
    tuned: Any,
    sequences: list[np.ndarray],
    options: TuneOptions,
    *,
    linked: bool,
    forced: list[str],
    summary: dict[str, Any],
) -> LeverFit:
    """Fit the levers on all but the last 1/``HOLDOUT_FOLDS`` of the validation text and
    keep them only if, on that last part, they do not make the perplexity worse than the
    policy alone."""
    from knn_store.doc_cache import DocumentCache
    from knn_store.tuning import HOLDOUT_FOLDS, fit_levers

    fit_part, held = split_held_out(sequences, HOLDOUT_FOLDS)
    levers = fit_levers(tuned, fit_part, max_cost=options.pointer_budget / 100, pointers=linked)
    cache = (
        DocumentCache(temperature=levers.cache_temperature, weight=levers.cache_weight)
        if levers.cache_weight and levers.cache_temperature is not None
        else None
    )
    plain = tuned.evaluate(held)
    with_levers = tuned.with_options(pointer_min=levers.pointer_min, cache=cache).evaluate(held)
    change = math.expm1((with_levers.knn_nll - plain.knn_nll) / plain.tokens)
    summary["levers"] = _levers_summary(levers, linked=linked)
    summary["levers"]["held_out_change_percent"] = 100 * change
    if change > 0:
        message = (
            f"the fitted levers (document cache weight {levers.cache_weight:g}, pointer "
            f"threshold {levers.pointer_min}) make the last {1 / HOLDOUT_FOLDS:.0%} of the "
            f"validation text, which they were not fitted on, {100 * change:+.2f}% worse in "
            "perplexity than the policy alone; nothing saved: tune without --fit-levers, or "
            "give more validation text (or --force)"
        )
        if not options.force:
            raise ConfigError(message)
        forced.append(message)
    return levers


def _levers_summary(fit: LeverFit, *, linked: bool) -> dict[str, Any]:
    """The fitted cache and pointer threshold, and the validation perplexity of each
    candidate, for the report."""
    base = fit.pointer_nll[0]
    return {
        "cache_weight": fit.cache_weight,
        "cache_temperature": fit.cache_temperature,
        "cache_grid": {
            "temperatures": fit.cache_temperatures,
            "weights": fit.cache_weights,
            "validation_perplexity": [[math.exp(x) for x in row] for row in fit.cache_nll],
        },
        "pointer_min": fit.pointer_min,
        "pointers_fitted": linked,
        "pointer_candidates": [
            {
                "pointer_min": t,
                "searches_saved_share": saved,
                "validation_perplexity": math.exp(nll),
                "change_percent": 100 * math.expm1(nll - base),
            }
            for t, nll, saved in zip(
                fit.thresholds, fit.pointer_nll, fit.pointer_saved, strict=True
            )
        ],
        "validation_perplexity": math.exp(fit.nll),
        "searches_saved_share": fit.searches_saved,
    }


def _gate_summary(fit: Any, result: TuneResult, kind: str) -> dict[str, Any]:
    """Share of searches the gate skips, and perplexity with and without it."""

    def split(name: str, skipped: float | None, nll: float | None) -> dict[str, Any] | None:
        if skipped is None or nll is None:
            return None
        ungated = getattr(result, name)[kind]
        return {
            "skipped_share": skipped,
            "perplexity": math.exp(nll),
            "change_percent": 100 * (math.exp(nll - ungated) - 1),
        }

    return {
        "threshold": None if fit.gate is None else fit.gate.threshold,
        "validation": split("validation", fit.validation_skipped, fit.validation_nll),
        "test": split("test", fit.test_skipped, fit.test_nll) if result.test else None,
    }


def _summary(result: TuneResult, retrieve_seconds: float) -> dict[str, Any]:
    def ppl(nll: float | None) -> float | None:
        return None if nll is None else math.exp(nll)

    rows: dict[str, dict[str, Any]] = {}
    for name in ("base", "paper", *(p for p in POLICY_CHOICES if p in result.policies)):
        fitted = result.policies.get(name)
        rows[name] = {
            "temperature": 1.0 if name == "paper" else (fitted.temperature if fitted else None),
            "policy": fitted.policy.to_dict() if fitted else None,
            "validation_perplexity": ppl(result.validation[name]),
            "test_perplexity": ppl(result.test[name]) if result.test else None,
        }
    return {
        "validation_tokens": result.validation_tokens,
        "test_tokens": result.test_tokens,
        "retrieve_seconds": round(retrieve_seconds, 2),
        "sweep_seconds": round(result.sweep_seconds, 3),
        "policies": rows,
    }


__all__ = [
    "POLICY_CHOICES",
    "TuneOptions",
    "TuneOutcome",
    "split_held_out",
    "tune_collection",
    "tune_evidence",
]
