"""`knnlm tune --fit-levers`: the document cache and pointer threshold it saves are what a
brute-force grid of whole evals over the same candidates picks, and eval then uses them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from knn_store import KnnlmSettings, StoreDamaged, load_language_model, open_session
from knn_store.saved_policy import SavedPolicy, verify_policy
from knn_store.tune_collection import split_held_out
from knn_store.tuning import (
    CACHE_TEMPERATURE_FACTORS,
    CACHE_WEIGHTS,
    HOLDOUT_FOLDS,
    POINTER_THRESHOLDS,
)
from tests.test_cli import Knnlm, _json_ok
from tests.test_tune_cli import VALIDATION, _run, knnlm, splits  # noqa: F401 (fixtures)

BUDGET = 5.0  # percent: generous, so that the tiny model's pointers can save searches


def _settings(runner: Knnlm, collection: str, **levers: object) -> KnnlmSettings:
    """In-process settings equal to what ``_run`` passes to the CLI, plus ``levers``."""
    return KnnlmSettings(
        model=str(runner.model),
        model_cache=runner.tmp / "cache",
        data_dir=runner.data_dir,
        collection=collection,
        window=16,
        stride=8,
        top_k=8,
        exact=True,
        **levers,
    )


def test_fitted_levers_are_the_brute_force_choice_and_eval_uses_them(
    knnlm: Knnlm,  # noqa: F811
    splits: tuple[Path, Path],  # noqa: F811
) -> None:
    validation, test = splits
    done = knnlm("rebuild", *knnlm.store_args(), "--to-collection", "linked", "--successors", "-q")
    assert done.exit_code == 0, done.output
    tune_args = ("--exact", "--buckets", "4", "--fit-levers", "--pointer-budget", str(BUDGET))
    report = _json_ok(
        _run(knnlm, "tune", str(validation), *tune_args, "--collection", "linked", "-q", "--json")
    )
    levers = report["levers"]
    assert levers["pointers_fitted"] is True

    # brute force: one whole eval per candidate, with explicit flags, of the part of the
    # validation text the levers are fitted on (the last quarter is held out to check them)
    lm = load_language_model(_settings(knnlm, "linked"))
    assert levers["held_out_change_percent"] <= 0

    def evaluate(**flags: object) -> tuple[float, float]:
        with open_session(_settings(knnlm, "linked", **flags), lm=lm) as session:
            fit_part, _ = split_held_out(session.encode(VALIDATION), HOLDOUT_FOLDS)
            result = session.knn_lm.evaluate(fit_part)
        return result.knn_nll / result.tokens, (result.followed or 0) / result.tokens

    with open_session(_settings(knnlm, "linked"), lm=lm) as session:
        assert session.resolved.source == "tuned"
        t_knn = session.resolved.temperature
    temps = [t_knn * f for f in CACHE_TEMPERATURE_FACTORS]
    grid = {
        (t, w): evaluate(pointer_min=0, cache_weight=w, cache_temperature=t)[0]
        for t in temps
        for w in CACHE_WEIGHTS
    }
    (t_best, w_best), best_nll = min(grid.items(), key=lambda item: item[1])  # first of ties
    assert w_best > 0, "the validation code repeats itself: the cache should help"
    assert levers["cache_weight"] == w_best
    assert levers["cache_temperature"] == pytest.approx(t_best)
    for (t, w), nll in grid.items():  # tune's grid is eval's, cell by cell
        row, col = temps.index(t), CACHE_WEIGHTS.index(w)
        cell = levers["cache_grid"]["validation_perplexity"][row][col]
        assert cell == pytest.approx(math.exp(nll), rel=1e-5)

    cache = {"cache_weight": w_best, "cache_temperature": t_best}
    runs = {t: evaluate(pointer_min=t, **cache) for t in POINTER_THRESHOLDS if t <= 8}
    budget = best_nll + math.log1p(BUDGET / 100)
    # tune walks down from the highest threshold and stops at the first over the budget;
    # the lowest it passed that followed any pointer wins
    walked = []
    for t in sorted(runs, reverse=True):
        walked.append(t)
        if runs[t][0] > budget:
            break
    chosen = min((t for t in walked if runs[t][0] <= budget and runs[t][1] > 0), default=0)
    assert levers["pointer_min"] == chosen
    assert [c["pointer_min"] for c in levers["pointer_candidates"]] == [0, *sorted(walked)]
    for c in levers["pointer_candidates"][1:]:
        nll, saved = runs[c["pointer_min"]]
        assert c["searches_saved_share"] == pytest.approx(saved)
        assert c["validation_perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert chosen > 0, "the budget should let the tiny model's pointers save searches"

    # saved with the policy, and eval uses them as if given explicitly
    with open_session(_settings(knnlm, "linked"), lm=lm) as session:
        assert session.saved is not None
        assert session.saved.pointer_min == chosen
        assert session.saved.cache_weight == w_best
        line = verify_policy(session.saved.to_dict(), session.store)  # what `check` prints
        assert line.endswith(f", cache {w_best:g} at T={t_best:.4g}, pointers >= {chosen}")
    flags = ("--exact", "-q", "--json", "--collection", "linked")
    implicit = _json_ok(_run(knnlm, "eval", str(test), *flags))
    explicit = _json_ok(
        _run(
            knnlm,
            "eval",
            str(test),
            *flags,
            "--pointer-min",
            str(chosen),
            "--cache-weight",
            str(w_best),
            "--cache-temperature",
            repr(t_best),
        )
    )
    for key in ("knn_perplexity", "followed_pointers", "searches", "pointer_min", "cache"):
        assert implicit.get(key) == explicit.get(key), key
    assert implicit["pointer_min"] == chosen and implicit["followed_pointers"] > 0
    # an explicit 0 turns each off: the plain tuned kNN-LM
    off = _json_ok(
        _run(knnlm, "eval", str(test), *flags, "--pointer-min", "0", "--cache-weight", "0")
    )
    assert "pointer_min" not in off and "cache" not in off and "followed_pointers" not in off
    assert off["searches"] == off["tokens"] - round(off["tokens"] * off["skipped_share"])
    # the other readers of the saved policy still answer on the tuned, linked collection
    explained = _run(
        knnlm, "explain", "--collection", "linked", "--exact", "--json", "-t", VALIDATION[0][:40]
    )
    assert explained.exit_code == 0, explained.output
    generated = _run(
        knnlm,
        "generate",
        "--collection",
        "linked",
        "-p",
        VALIDATION[0][:20],
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert generated.exit_code == 0, generated.output


def test_an_unlinked_collection_fits_the_cache_only(
    knnlm: Knnlm,  # noqa: F811
    splits: tuple[Path, Path],  # noqa: F811
) -> None:
    validation, _ = splits
    result = _run(
        knnlm, "tune", str(validation), "--exact", "--buckets", "4", "--fit-levers", "-q", "--json"
    )
    report = _json_ok(result)
    assert "rebuild --successors" in result.stderr
    levers = report["levers"]
    assert levers["pointers_fitted"] is False and levers["pointer_min"] == 0
    assert [c["pointer_min"] for c in levers["pointer_candidates"]] == [0]
    assert len(levers["cache_grid"]["validation_perplexity"]) == len(CACHE_TEMPERATURE_FACTORS)
    with open_session(_settings(knnlm, "test")) as session:
        assert session.saved is not None and session.saved.cache_weight == levers["cache_weight"]
        assert session.knn_lm.pointer_min == 0 and session.knn_lm.cache is not None
    # the table says what was fitted
    table = _run(knnlm, "tune", str(validation), "--exact", "--buckets", "4", "--fit-levers", "-q")
    assert table.exit_code == 0, table.output
    assert "levers: document cache weight" in table.stdout and "pointers off" in table.stdout
    # without --fit-levers, tune's report and saved policy are as before
    plain = _json_ok(
        _run(knnlm, "tune", str(validation), "--exact", "--buckets", "4", "-q", "--json")
    )
    assert "levers" not in plain
    with open_session(_settings(knnlm, "test")) as session:
        assert session.saved is not None and session.saved.pointer_min == 0
        assert session.saved.cache_weight == 0 and session.knn_lm.cache is None


def test_policies_saved_before_the_levers_load_with_them_off() -> None:
    new = SavedPolicy.from_dict(
        {
            "policy": {"kind": "fixed", "lambda": 0.3},
            "temperature": 2.0,
            "k": 8,
            "model_fingerprint": "f",
            "key_type": "final",
            "pointer_min": 4,
            "cache_weight": 0.1,
            "cache_temperature": 0.5,
        },
        collection="c",
    )
    assert (new.pointer_min, new.cache_weight, new.cache_temperature) == (4, 0.1, 0.5)
    old = new.to_dict()
    for key in ("pointer_min", "cache_weight", "cache_temperature"):
        del old[key]
    loaded = SavedPolicy.from_dict(old, collection="c")
    assert (loaded.pointer_min, loaded.cache_weight, loaded.cache_temperature) == (0, 0.0, None)
    assert SavedPolicy.from_dict(new.to_dict(), collection="c").cache_temperature == 0.5
    for bad in ({"pointer_min": -1}, {"cache_weight": 2.0}, {"cache_temperature": 0}):
        with pytest.raises(StoreDamaged, match="run `knnlm tune` again"):
            SavedPolicy.from_dict({**new.to_dict(), **bad}, collection="c")
