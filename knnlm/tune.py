"""``knnlm tune``: fit T and the lambda policies on validation text, report, save one."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from knn_store.errors import ConfigError
from knnlm.options import (
    MODEL_OPTIONS,
    RETRIEVAL_OPTIONS,
    STORE_OPTIONS,
    corpus_options,
    options,
    output_options,
    print_skipped,
    search_domain_option,
    settings_from,
)
from knnlm.progress import Bars

POLICY_CHOICES = ("fixed", "buckets", "cosine-buckets", "learned", "learned-t")
LABELS = {
    "base": "base LM",
    "paper": "lambda 0.25, T 1",
    "fixed": "fixed lambda",
    "buckets": "d_min buckets",
    "cosine-buckets": "cosine buckets",
    "learned": "learned (MLP)",
    "learned-t": "learned, T per pos",
}


@click.command()
@corpus_options
@click.option(
    "--test",
    "test_paths",
    multiple=True,
    type=click.Path(path_type=str),
    help="Test text (repeatable): scored with the policies fitted on PATHS, never fitted on.",
)
@click.option(
    "--buckets",
    default=64,
    show_default=True,
    type=click.IntRange(2, 10_000),
    help="Equal-population buckets of the adaptive policies.",
)
@click.option(
    "--save",
    "save_kind",
    type=click.Choice([*POLICY_CHOICES, "none"]),
    default="buckets",
    show_default=True,
    help="Which fitted policy to save with the collection for eval and generate.",
)
@click.option(
    "--learn-temperature",
    is_flag=True,
    help="Also fit learned-t: the learned policy with the kNN temperature set per position "
    "from the same features, T(x) = T * exp(g(x)), trained jointly with lambda starting from "
    "the global T; reported beside the others (implied by --save learned-t).",
)
@click.option(
    "--plots",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for PNG charts: perplexity vs lambda per T, lambda per bucket.",
)
@click.option(
    "--gate-max-cost",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 100.0),
    help="Retrieval gate: skip as many searches as keeps the validation perplexity of the "
    "saved policy within this many percent; 0 fits no gate.",
)
@click.option(
    "--fit-levers",
    is_flag=True,
    help="Also fit the document cache's temperature and weight for the saved policy, and on "
    "a collection linked by `knnlm rebuild --successors` the pointer threshold, on the "
    "validation text; eval then uses them unless --cache-weight or --pointer-min say "
    "otherwise. One more LM pass, with one search pass per threshold tried.",
)
@click.option(
    "--pointer-budget",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 100.0),
    help="With --fit-levers: the pointer threshold that saves the most searches while the "
    "validation perplexity rises by at most this many percent over no pointers (tried "
    "from 1024 down, stopping at the first over the budget).",
)
@search_domain_option
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *RETRIEVAL_OPTIONS)
@output_options
def tune(
    paths: tuple[str, ...],
    glob_pattern: str,
    text_field: str,
    skip_invalid: bool,
    test_paths: tuple[str, ...],
    buckets: int,
    save_kind: str,
    learn_temperature: bool,
    plots: Path | None,
    gate_max_cost: float,
    fit_levers: bool,
    pointer_budget: float,
    search_domains: tuple[str, ...],
    as_json: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Choose T and lambda on validation text, and save the policy with the collection.

    Retrieves once for every token of PATHS, caches the neighbours' distances and values
    with the LM's probabilities, then fits from that cache in seconds: a fixed lambda (every
    T and lambda on a grid), Drozdov et al.'s adaptive lambda (equal-population buckets of
    the nearest distance, or of the cosine to the nearest key), and a small learned model
    of several features. Then it fits a retrieval gate for the saved policy: positions
    where the LM is sure enough skip the search. Use text the datastore does not hold, and
    report on --test text: never tune and report on the same text.

    \b
    It refuses, and saves nothing:
      - validation text too small for the policy: 32 tokens per bucket (--buckets 64:
        2,048), 256 for learned, 512 for learned-t, 64 for fixed (and with --save none);
      - text the datastore already holds: over 50% of its tokens find their own key
        (cosine to the nearest key >= 0.9999);
      - a policy worse than the base LM on validation;
      - a policy whose validation gain is within noise (under 2 standard errors) while
        it moves the --test perplexity by more than 5% either way.

    \b
    Examples:
      knnlm tune valid/ --test test/ --plots results/
      knnlm tune valid.jsonl --save learned --json
    """
    from ingest.corpus import CorpusReport, read_corpus
    from knn_store import open_session
    from knn_store.saved_policy import SavedPolicy
    from knn_store.tuning import (
        check_not_held,
        check_saveable,
        check_tuning_size,
        collect,
        fit_gate,
    )
    from knn_store.tuning import fit_levers as fit_cache_and_pointers
    from knn_store.tuning import tune as fit_all

    if not math.isfinite(gate_max_cost):
        raise ConfigError(f"--gate-max-cost must be a finite percentage, got {gate_max_cost}")
    if not math.isfinite(pointer_budget):
        raise ConfigError(f"--pointer-budget must be a finite percentage, got {pointer_budget}")
    if fit_levers and save_kind == "none":
        raise click.UsageError("--fit-levers fits levers for the saved policy: drop --save none")
    settings = settings_from(params)

    def read(where: tuple[str, ...]) -> list[str]:
        report = CorpusReport()
        docs = read_corpus(
            where,
            glob=glob_pattern,
            text_field=text_field,
            skip_invalid=skip_invalid,
            report=report,
        )
        texts = [d.text for d in docs]
        print_skipped(report)
        return texts

    validation_texts = read(paths)
    test_texts = read(test_paths) if test_paths else []
    shared = set(validation_texts) & set(test_texts)
    if shared:
        raise ConfigError(
            f"{len(shared)} documents are both in the validation PATHS and in --test; "
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
        # every token after the first is scored once
        tokens = sum(max(len(s) - 1, 0) for s in sequences)
        check_tuning_size(tokens, save_kind, buckets=buckets)
        with Bars(quiet=quiet) as bars:
            validation = collect(knn_lm, sequences, on_progress=bars)
        check_not_held(validation)
        with Bars(quiet=quiet) as bars:
            test = (
                collect(knn_lm, session.encode(test_texts), on_progress=bars)
                if test_texts
                else None
            )
        retrieve_seconds = time.perf_counter() - started
        result = fit_all(
            validation,
            test,
            buckets=buckets,
            learn_temperature=learn_temperature or save_kind == "learned-t",
        )
        summary = _summary(result, retrieve_seconds)
        if save_kind != "none":
            chosen = result.policies[save_kind]
            gate = None
            if gate_max_cost > 0:
                gate = fit_gate(validation, chosen, max_cost=gate_max_cost / 100, test=test)
                summary["gate"] = _gate_summary(gate, result, save_kind)
            check_saveable(validation, chosen, gate=None if gate is None else gate.gate, test=test)
            meta = session.store.meta
            assert meta is not None
            levers = None
            if fit_levers:
                if not meta.successors:
                    click.echo(
                        f"pointer threshold not fitted: collection {settings.collection!r} has "
                        "no successor links; run `knnlm rebuild --successors` to fit it",
                        err=True,
                    )
                tuned = knn_lm.with_options(
                    policy=chosen.policy,
                    temperature=chosen.temperature,
                    gate=None if gate is None else gate.gate,
                )
                with Bars(quiet=quiet) as bars:
                    levers = fit_cache_and_pointers(
                        tuned,
                        sequences,
                        max_cost=pointer_budget / 100,
                        pointers=meta.successors,
                        on_progress=bars,
                    )
                summary["levers"] = _levers_summary(levers, linked=meta.successors)
            saved = SavedPolicy(
                policy=chosen.policy,
                temperature=chosen.temperature,
                k=knn_lm.k,
                model_fingerprint=meta.model_fingerprint,
                key_type=meta.key_type,
                gate=None if gate is None else gate.gate,
                domains=knn_lm.filter.domains,
                report={"name": save_kind, **summary["policies"][save_kind]},
                pointer_min=0 if levers is None else levers.pointer_min,
                cache_weight=0.0 if levers is None else levers.cache_weight,
                cache_temperature=None if levers is None else levers.cache_temperature,
            )
            session.store.save_policy(saved.to_dict())
    summary.update(
        collection=settings.collection,
        saved=None if save_kind == "none" else save_kind,
        domains=list(knn_lm.filter.domains),
    )
    if plots is not None:
        from knnlm.plots import write_tuning_plots

        title = f"{settings.collection} ({session.lm.key_type})"
        summary["plots"] = [str(p) for p in write_tuning_plots(result, plots, title=title)]
    if as_json:
        click.echo(json.dumps(summary))
        return
    _print_table(summary)


def _levers_summary(fit: Any, *, linked: bool) -> dict[str, Any]:
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


def _gate_summary(fit: Any, result: Any, kind: str) -> dict[str, Any]:
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


def _summary(result: Any, retrieve_seconds: float) -> dict[str, Any]:
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


def _print_table(summary: dict[str, Any]) -> None:
    rows = summary["policies"]
    has_test = summary["test_tokens"] is not None
    header = f"{'policy':18}{'T':>9}  {'validation':>18}"
    click.echo(header + (f"  {'test':>18}" if has_test else ""))

    def cell(name: str, split: str) -> str:
        value, base = rows[name][f"{split}_perplexity"], rows["base"][f"{split}_perplexity"]
        if name == "base":
            return f"{value:10.3f}{'':8}"
        return f"{value:10.3f} ({100 * (value / base - 1):+5.1f}%)"

    for name, row in rows.items():
        t = "-" if row["temperature"] is None else f"{row['temperature']:.4g}"
        label = LABELS[name]
        if name == "fixed":
            label += f" {row['policy']['lambda']:.2f}"
        line = f"{label:18}{t:>9}  {cell(name, 'validation'):>18}"
        click.echo(line + (f"  {cell(name, 'test'):>18}" if has_test else ""))
    tokens = f"{summary['validation_tokens']:,} validation"
    if has_test:
        tokens += f" + {summary['test_tokens']:,} test"
    click.echo(
        f"retrieval {summary['retrieve_seconds']:.1f}s for {tokens} tokens; "
        f"sweep {summary['sweep_seconds']:.2f}s"
    )
    gate = summary.get("gate")
    if gate is not None and gate["threshold"] is not None:
        parts = [
            f"{split} {100 * g['skipped_share']:.0f}% skipped ({g['change_percent']:+.2f}% ppl)"
            for split, g in (("validation", gate["validation"]), ("test", gate["test"]))
            if g is not None
        ]
        click.echo(f"retrieval gate: {'; '.join(parts)}")
    elif gate is not None:
        click.echo("retrieval gate: none (no threshold keeps the perplexity within the budget)")
    levers = summary.get("levers")
    if levers is not None:
        cache = (
            f"weight {levers['cache_weight']:g}, T {levers['cache_temperature']:.4g}"
            if levers["cache_weight"]
            else "off (no weight of the grid helps)"
        )
        pointers = (
            f"pointer threshold {levers['pointer_min']}, "
            f"{100 * levers['searches_saved_share']:.0f}% of searches saved"
            if levers["pointer_min"]
            else "pointers off"
        )
        click.echo(
            f"levers: document cache {cache}; {pointers}; validation perplexity "
            f"{levers['validation_perplexity']:.3f}"
        )
    if summary["saved"]:
        click.echo(f"saved the {LABELS[summary['saved']]} policy with {summary['collection']!r}")
    for path in summary.get("plots", []):
        click.echo(f"wrote {path}", err=True)
    sys.stdout.flush()
