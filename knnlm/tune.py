"""``knnlm tune``: fit T and the lambda policies on validation text, report, save one."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from knn_store.errors import ConfigError
from knn_store.tune_collection import POLICY_CHOICES
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
@click.option(
    "--force",
    is_flag=True,
    help="Save even where a rule below refuses (not where the text is too small to fit "
    "on). The saved record lists each refusal overridden (`knnlm info --json` shows it).",
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
    force: bool,
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

    A policy is saved only if it beats the base LM on validation text it was not fitted
    on: the validation tokens are cut into 4 folds (stretches of text, in order), and the
    policy is fitted again on 3 of them and scored on the fourth, each fold in turn. The
    levers are fitted on the first 3/4 and kept only if they do not make the last 1/4
    worse.

    \b
    It refuses, and saves nothing (--force saves anyway, and the record says so):
      - validation text too small to fit the policy on 3 of 4 folds: 32 tokens per
        bucket (--buckets 64: 2,731 in all), 342 for learned, 683 for learned-t, 86 for
        fixed (64 with --save none; --force does not lower these);
      - text the datastore already holds: over 50% of its tokens find their own key
        (cosine to the nearest key >= 0.9999);
      - text it nearly repeats: over 15% of its tokens find a near copy (cosine >= 0.99;
        held-out text finds 2-3%);
      - a policy worse than the base LM on validation, or on the folds held out;
      - a policy whose validation gain is within noise (under 2 standard errors) while
        it moves the --test perplexity by more than 5% either way;
      - with --fit-levers, levers that make the held-out last part worse.

    \b
    Examples:
      knnlm tune valid/ --test test/ --plots results/
      knnlm tune valid.jsonl --save learned --json
    """
    from ingest.corpus import CorpusReport, read_corpus
    from knn_store.tune_collection import TuneOptions, tune_collection

    for flag, value in (("--gate-max-cost", gate_max_cost), ("--pointer-budget", pointer_budget)):
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite percentage, got {value}")
    if fit_levers and save_kind == "none":
        raise click.UsageError("--fit-levers fits levers for the saved policy: drop --save none")
    options = TuneOptions(
        save=save_kind,
        buckets=buckets,
        learn_temperature=learn_temperature,
        gate_max_cost=gate_max_cost,
        fit_levers=fit_levers,
        pointer_budget=pointer_budget,
        force=force,
    )

    def read(where: tuple[str, ...]) -> list[str]:
        report = CorpusReport()
        docs = read_corpus(
            where,
            glob=glob_pattern,
            text_field=text_field,
            skip_invalid=skip_invalid,
            report=report,
        )
        texts = [d.text for d in docs]  # read to the end: the report is complete
        print_skipped(report)
        return texts

    settings = settings_from(params)
    validation_texts = read(paths)
    test_texts = read(test_paths) if test_paths else []
    with Bars(quiet=quiet) as bars:
        outcome = tune_collection(
            settings,
            validation_texts,
            test_texts,
            search_domains=search_domains,
            options=options,
            on_progress=bars,
        )
    for note in outcome.notes:
        click.echo(note, err=True)
    summary = outcome.summary
    if plots is not None:
        from knnlm.plots import write_tuning_plots

        title = f"{settings.collection} ({outcome.key_type})"
        written = write_tuning_plots(outcome.result, plots, title=title)
        summary["plots"] = [str(p) for p in written]
    if as_json:
        click.echo(json.dumps(summary))
        return
    _print_table(summary)


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
