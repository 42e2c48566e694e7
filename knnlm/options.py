"""Flags shared by the ``knnlm`` commands, and the set-up most commands share.

Every flag comes from a ``KnnlmSettings`` field and is also an environment variable
(``--top-k`` is ``KNNLM_TOP_K``); flags win.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import ValidationError

from knn_store.errors import ConfigError
from knn_store.settings import KnnlmSettings

if TYPE_CHECKING:
    from knn_store.knn_lm import KnnLM
    from knn_store.lm import LanguageModel
    from knn_store.saved_policy import Resolved
    from knn_store.store.base import KnnStore

F = TypeVar("F", bound=Callable[..., Any])

# Settings field (or its env alias) -> CLI flag name, where they differ.
_FLAG_NAMES = {"lmbda": "lambda", "knnlm_lambda": "lambda"}


def option(field: str, **overrides: Any) -> Callable[[F], F]:
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
    elif annotation in (float, float | None):
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


def options(*fields: str) -> Callable[[F], F]:
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
            fn = option(field, **extra)(fn)
        return fn

    return decorate


def settings_from(params: dict[str, Any]) -> KnnlmSettings:
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


def corpus_options(fn: F) -> F:
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


search_domain_option = click.option(
    "--search-domain",
    "search_domains",
    multiple=True,
    help="Retrieve only from this domain (repeatable; default: every domain).",
)


def output_options(fn: F) -> F:
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")(fn)


def windows_for(settings: KnnlmSettings, lm: LanguageModel) -> tuple[int, int]:
    window = settings.window or lm.default_window()
    if window > lm.max_positions:
        raise ConfigError(
            f"--window ({window}) exceeds the model's context ({lm.max_positions} tokens)"
        )
    stride = settings.stride or max(1, window // 2)
    if stride > window:
        raise ConfigError(f"--stride ({stride}) must not exceed --window ({window})")
    return window, stride


@dataclass
class Session:
    """An opened collection with its LM and kNN-LM, ready to query."""

    settings: KnnlmSettings
    store: KnnStore
    lm: LanguageModel
    knn_lm: KnnLM
    resolved: Resolved
    window: int
    stride: int


@contextmanager
def open_session(
    settings: KnnlmSettings, *, search_domains: tuple[str, ...] = ()
) -> Iterator[Session]:
    """Open the collection, load the model that built it, and set T and lambda.

    With no ``--key-type`` the collection's own is used. T and lambda come from the flags,
    else from the collection's tuned policy, else from the defaults (``resolve_policy``).
    """
    from knn_store import KnnLM, load_language_model, open_store
    from knn_store.saved_policy import SavedPolicy, resolve_policy

    store = open_store(settings, create=False)
    try:
        meta = store.meta
        assert meta is not None
        if "key_type" not in settings.model_fields_set:  # no --key-type: the collection's own
            settings = settings.model_copy(update={"key_type": meta.key_type})
        lm = load_language_model(settings)
        meta.check_compatible(lm.collection_meta(), collection=settings.collection)
        window, stride = windows_for(settings, lm)
        raw = store.load_policy()
        saved = None if raw is None else SavedPolicy.from_dict(raw, collection=settings.collection)
        resolved = resolve_policy(
            saved, meta, lmbda=settings.lmbda, temperature=settings.temperature
        )
        if resolved.source.startswith("tuned") and saved and saved.k != settings.top_k:
            print(
                f"knnlm: note: the tuned policy was fitted with --top-k {saved.k}, "
                f"not {settings.top_k}",
                file=sys.stderr,
            )
        knn_lm = KnnLM(
            store,
            k=settings.top_k,
            temperature=resolved.temperature,
            lambda_policy=resolved.policy,
            exact=settings.exact,
            hnsw_ef=settings.search_ef(),
            search_batch=settings.search_batch,
            domains=list(search_domains) or None,
        )
        yield Session(settings, store, lm, knn_lm, resolved, window, stride)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        store.close()


def describe_policy(session: Session) -> str:
    """One line: which policy, T and where they came from."""
    r = session.resolved
    return f"policy {r.policy!r} T={r.temperature:g} ({r.source})"
