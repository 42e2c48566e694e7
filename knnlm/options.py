"""Flags shared by the ``knnlm`` commands, made from ``KnnlmSettings`` fields.

Every flag is also an environment variable (``--top-k`` is ``KNNLM_TOP_K``); flags win. The
help of each flag is its field's description, so the two never drift apart.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import ValidationError

from knn_store.errors import ConfigError
from knn_store.settings import KnnlmSettings

F = TypeVar("F", bound=Callable[..., Any])

# Settings field (or its env alias) -> CLI flag name, where they differ.
_FLAG_NAMES = {"lmbda": "lambda", "knnlm_lambda": "lambda"}

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
STORE_OPTIONS = (
    "backend",
    "collection",
    "data_dir",
    "url",
    "api_key",
    "allow_insecure_api_key",
    "prefer_grpc",
    "grpc_port",
    "ca_cert",
    "timeout",
    "retries",
)
# Flags that only a Qdrant server takes: refused beside another --backend.
SERVER_ONLY = ("url", "prefer_grpc", "ca_cert")
STORAGE_OPTIONS = (
    "vector_datatype",
    "quantization",
    "vectors_on_disk",
    "index_on_disk",
    "hnsw_m",
    "hnsw_ef_construct",
    "indexing_threshold_kb",
    "shard_number",
    "replication_factor",
    "write_consistency_factor",
)
# How retrieval searches (what tune takes), then how it weighs what it found.
RETRIEVAL_OPTIONS = (
    "top_k",
    "exact",
    "hnsw_ef",
    "rescore",
    "oversampling",
    "search_threads",
    "search_batch",
)
SEARCH_OPTIONS = (*RETRIEVAL_OPTIONS, "lmbda", "temperature", "gate")
# Levers that save searches or add memory: pointer following and the document
# cache. ``open_session`` builds them from the settings, so each command that lists these
# flags gets them the same way.
LEVER_OPTIONS = ("pointer_min", "cache_weight", "cache_temperature")


def flag_name(field: str) -> str:
    return "--" + _FLAG_NAMES.get(field, field).replace("_", "-")


def option(field: str, **overrides: Any) -> Callable[[F], F]:
    """A click option for one ``KnnlmSettings`` field, documented from the field itself."""
    info = KnnlmSettings.model_fields[field]
    flag = flag_name(field)
    env = "KNNLM_" + _FLAG_NAMES.get(field, field).upper()
    default = info.get_default(call_default_factory=False)
    shown = "" if default is None or info.default_factory else f" [default: {default}]"
    kwargs: dict[str, Any] = {"default": None, "help": f"{info.description}{shown} [env: {env}]"}
    annotation = _unwrap_optional(info.annotation)
    decls = [flag, field]
    if annotation is bool:  # --x/--no-x, so a flag can undo an environment variable
        decls = [f"{flag}/--no-{flag[2:]}", field]
        kwargs["default"] = None
    elif typing.get_origin(annotation) is Literal:
        kwargs["type"] = click.Choice([str(a) for a in typing.get_args(annotation)])
    elif annotation is int:
        kwargs["type"] = int
    elif annotation is float:
        kwargs["type"] = float
    elif annotation is Path:
        kwargs["type"] = click.Path(path_type=Path)
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def options(*fields: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        for field in reversed(fields):
            extra: dict[str, Any] = {}
            if field == "api_key":
                extra["help"] = (
                    "Qdrant API key; prefer the KNNLM_API_KEY variable, "
                    "which no process list shows."
                )
            fn = option(field, **extra)(fn)
        return fn

    return decorate


def settings_from(
    params: dict[str, Any], *, flags: dict[str, str] | None = None, **changes: Any
) -> KnnlmSettings:
    """Settings from the environment, overridden by the flags given (and ``changes``).

    ``flags`` names the flag a field came from where it is not the field's own (the target
    of a copy is ``--to-collection``), for error messages.
    """
    given = {k: v for k, v in params.items() if k in KnnlmSettings.model_fields and v is not None}
    given.update(changes)
    backend = given.get("backend")
    if backend is not None and backend != "qdrant":  # both said on this command line
        for field in SERVER_ONLY:
            if given.get(field):
                flag = (flags or {}).get(field) or flag_name(field)
                raise ConfigError(
                    f"{flag} is for a Qdrant server, but --backend is {backend!r}: drop "
                    f"{flag}, or use --backend qdrant"
                )
    try:
        settings = KnnlmSettings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                field = str(err["loc"][0])
                message = f"{(flags or {}).get(field) or flag_name(field)}: {message}"
            problems.append(message)
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
    if settings.threads:  # process-wide, so the command decides it, never the library
        import torch

        torch.set_num_threads(settings.threads)
    return settings


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


class _CommaList(click.ParamType):
    """Text; from an environment variable, a comma-separated list (spaces around ignored)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value

    def split_envvar_value(self, rv: str) -> list[str]:
        return [part.strip() for part in rv.split(",") if part.strip()]


search_domain_option = click.option(
    "--search-domain",
    "search_domains",
    multiple=True,
    type=_CommaList(),
    envvar="KNNLM_SEARCH_DOMAIN",
    help="Retrieve only from this domain (repeatable; default: every domain). "
    "[env: KNNLM_SEARCH_DOMAIN, comma-separated]",
)


def print_skipped(report: Any) -> None:
    """Name on stderr each file ``--skip-invalid`` left out (empty files go unmentioned)."""
    for reason in report.reasons.values():
        if reason != "empty":
            click.echo(f"knnlm: skipped {reason}", err=True)


def output_options(fn: F) -> F:
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")(fn)
