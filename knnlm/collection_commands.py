"""Collection commands: ``info``, ``check``, ``domains list|drop``, ``rebuild`` and ``push``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from knn_store.errors import StoreDamaged, StoreUnavailable
from knnlm.options import SERVER_ONLY, STORAGE_OPTIONS, STORE_OPTIONS, options, settings_from
from knnlm.progress import Bars

if TYPE_CHECKING:
    pass


@click.command()
@options(*STORE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(as_json: bool, **params: Any) -> None:
    """Show a collection: points per domain, the model, key type and storage that built it,
    and its tuned policy. A damaged collection is reported as such (exit 1)."""
    from knn_store import open_store
    from knn_store.summary import collection_summary

    settings = settings_from(params)
    with open_store(settings) as store:
        data = collection_summary(store, backend=settings.backend)
        meta = store.meta
        assert meta is not None
    if as_json:
        click.echo(json.dumps(data))
        return
    shown = {k: v for k, v in data.items() if v is not None and k != "engine_storage"}
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        if key == "domains":
            value = ", ".join(f"{d} ({n:,})" for d, n in value.items()) or "-"
        elif key == "storage":
            value = meta.storage.describe()
        elif key == "policy":
            value = _describe_policy(value)
        elif isinstance(value, int):
            value = f"{value:,}"
        click.echo(f"{key:<{width}}  {value}")


def _describe_policy(value: dict[str, Any] | None) -> str:
    if value is None:
        return "none (lambda 0.25, T 1; run `knnlm tune`)"
    text = f"{value['kind']}, T={value['temperature']:.4g}, tuned with k={value['k']}"
    if value["gate_threshold"] is not None:
        text += f", retrieval gate {value['gate_threshold']:.3g}"
    if value["domains"]:
        text += f", on domains {', '.join(value['domains'])}"
    return f"{text}, saved {value['saved']}"


@click.command()
@options(*STORE_OPTIONS)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--seal-records",
    is_flag=True,
    help="Once, for a collection made by a knnlm older than checksums: accept its record, "
    "tuned policy and record of the last write without one, check everything else, and if "
    "sound, write them back sealed, with the content checksums of its files. "
    "Only for records you know to be right: every other command refuses a record without "
    "its checksum.",
)
def check(quiet: bool, seal_records: bool, **params: Any) -> None:
    """Verify a collection: its record, point counts, payload indexes, tuned policy, and
    that every key can be read. Exits 1 if anything is damaged.

    \b
    Example:
      knnlm check --collection kernel-docs
    """
    import contextlib

    from knn_store import open_store, summary
    from knn_store.store.records import accepting_unsealed

    settings = settings_from(params)
    with accepting_unsealed() if seal_records else contextlib.nullcontext([]) as unsealed:
        try:
            store = open_store(settings)
        except StoreDamaged as exc:
            click.echo(f"{'open':22} FAIL  {exc}")
            raise SystemExit(1) from None
        with store:
            with Bars(quiet=quiet) as bars:
                report = summary.check(store, on_progress=bars)
            sealed = summary.seal_records(store, unsealed) if report.ok and seal_records else []
    for f in report.findings:
        click.echo(f"{f.what:22} {'ok  ' if f.ok else 'FAIL'}  {f.detail}")
    if report.ok:
        if sealed:
            click.echo(f"sealed: {', '.join(sealed)}")
        click.echo(f"collection {settings.collection!r} is sound")
        return
    click.echo(f"collection {settings.collection!r} is damaged", err=True)
    raise SystemExit(1)


@click.group()
def domains() -> None:
    """List the domains of a collection, or drop one (its points only)."""


@domains.command("list")
@options(*STORE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def domains_list(as_json: bool, **params: Any) -> None:
    """Points per domain."""
    from knn_store import open_store

    with open_store(settings_from(params)) as store:
        counts = store.domains()
    if as_json:
        click.echo(json.dumps(counts))
        return
    for name, n in sorted(counts.items()):
        click.echo(f"{n:>12,}  {name}")


@domains.command("drop")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@options(*STORE_OPTIONS)
def domains_drop(name: str, yes: bool, **params: Any) -> None:
    """Delete every point of domain NAME; other domains stay untouched.

    \b
    Example:
      knnlm domains drop old-docs --yes
    """
    from knn_store import PointFilter, open_store
    from knn_store.session import check_domains

    with open_store(settings_from(params)) as store:
        check_domains(store, [name])
        n = store.domains()[name]
        if not yes:
            click.confirm(f"delete the {n:,} points of domain {name!r}?", abort=True, err=True)
        removed = store.delete(PointFilter(domains=(name,)))
        remaining = store.count()
        policy = store.load_policy() or {}
    click.echo(f"dropped domain {name!r}: -{removed:,} points, {remaining:,} remain")
    if policy:
        click.echo(
            "knnlm: note: the tuned policy was fitted before this drop; "
            "consider running `knnlm tune` again",
            err=True,
        )


@click.command()
@click.option("--to-collection", required=True, help="Name of the new collection.")
@click.option(
    "--only-domain",
    "only_domains",
    multiple=True,
    help="Copy only the points of this domain (repeatable; default: all).",
)
@click.option(
    "--into-existing",
    is_flag=True,
    help="Add the points to a target collection that exists and was not made by this copy "
    "(its record and tuned policy stay). Without it such a target is refused.",
)
@click.option(
    "--successors",
    is_flag=True,
    help="Give every point its successor's value (payload field `next`), which pointer "
    "following (`eval --pointer-min`) needs. Computed from the ids, without the LM.",
)
@options(*STORE_OPTIONS, *STORAGE_OPTIONS, "search_threads")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def rebuild(
    to_collection: str,
    only_domains: tuple[str, ...],
    into_existing: bool,
    successors: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Copy a collection into a new one with other storage settings, without the LM.

    The new collection takes the storage flags given here (datatype, quantization, on-disk
    vectors or index, HNSW m and ef_construct) and the source's for the rest. Resumable.

    \b
    Example:
      knnlm rebuild --collection docs --to-collection docs-f16 --vector-datatype float16
      knnlm rebuild --collection docs --to-collection docs-ptr --successors
    """
    from functools import partial

    from knn_store import open_store
    from knn_store.session import check_domains
    from knn_store.store.transfer import copy_collection

    settings = settings_from(params)
    target_settings = settings_from(
        params, flags={"collection": "--to-collection"}, collection=to_collection
    )
    if to_collection == settings.collection:
        raise click.BadParameter("must differ from --collection", param_hint="--to-collection")
    with open_store(settings) as source:
        domains = check_domains(source, only_domains)  # before anything is made on the target
        with open_store(target_settings, create=True) as target:
            copy = partial(copy_collection, successors=successors)
            _copy(source, target, settings, domains, quiet, copy, into_existing)


@click.command()
@click.option("--to-url", help="Target Qdrant server, e.g. https://xyz.cloud.qdrant.io:6333.")
@click.option(
    "--to-local",
    type=click.Path(file_okay=False),
    help="Target folder of qdrant-client's local mode instead of a server (for tests).",
)
@click.option("--to-collection", help="Name on the target (default: the same).")
@click.option(
    "--to-api-key",
    envvar="KNNLM_TO_API_KEY",
    help="API key of the target server; prefer the KNNLM_TO_API_KEY variable.",
)
@click.option(
    "--only-domain",
    "only_domains",
    multiple=True,
    help="Push only the points of this domain (repeatable; default: all).",
)
@click.option(
    "--into-existing",
    is_flag=True,
    help="Add the points to a target collection that exists and was not made by this copy "
    "(its record and tuned policy stay). Without it such a target is refused.",
)
@options(*STORE_OPTIONS, "shard_number", "replication_factor", "write_consistency_factor")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def push(
    to_url: str | None,
    to_local: str | None,
    to_collection: str | None,
    to_api_key: str | None,
    only_domains: tuple[str, ...],
    into_existing: bool,
    quiet: bool,
    **params: Any,
) -> None:
    """Copy a collection (settings, record, tuned policy, every point) to a Qdrant server.

    Resumable: run it again after an interruption and it goes on where it stopped. The
    counts of both sides are compared at the end. The source is the collection the store
    flags name (by default the embedded one).

    \b
    Examples:
      knnlm push --collection docs --to-url http://localhost:6333
      KNNLM_TO_API_KEY=... knnlm push --to-url https://xyz.cloud.qdrant.io:6333 \\
          --shard-number 2 --replication-factor 2
    """
    from knn_store import open_store
    from knn_store.session import check_domains
    from knn_store.store.transfer import copy_collection

    if (to_url is None) == (to_local is None):
        raise click.UsageError("give exactly one of --to-url and --to-local")
    source_params = params
    if params.get("backend") not in (None, "qdrant"):  # the server flags are the target's
        source_params = {k: v for k, v in params.items() if k not in SERVER_ONLY}
    settings = settings_from(source_params)
    target_changes: dict[str, Any] = {
        "collection": to_collection or settings.collection,
        "backend": "qdrant" if to_url else "local",
        "url": to_url,
        "api_key": to_api_key,
    }
    if to_local:
        target_changes["data_dir"] = to_local
    target_settings = settings_from(
        {k: v for k, v in params.items() if k not in ("url", "api_key", "data_dir")},
        flags={
            "collection": "--to-collection" if to_collection else "--collection",
            "url": "--to-url",
            "api_key": "--to-api-key",
            "data_dir": "--to-local",
        },
        **target_changes,
    )
    with open_store(settings) as source:
        domains = check_domains(source, only_domains)  # before anything is made on the target
        with open_store(target_settings, create=True) as target:
            _copy(source, target, target_settings, domains, quiet, copy_collection, into_existing)


def _copy(
    source: Any,
    target: Any,
    settings: Any,
    domains: tuple[str, ...],
    quiet: bool,
    copy_collection: Any,
    into_existing: bool = False,
) -> None:
    from dataclasses import replace

    from knn_store import PointFilter

    assert source.meta is not None
    flt = PointFilter(domains=domains)
    # A target that exists (a copy to resume) keeps its own settings unless flags say others.
    base = (target.meta or source.meta).storage
    storage = replace(base, **settings.storage_overrides())
    try:
        with Bars(quiet=quiet) as bars:
            report = copy_collection(
                source,
                target,
                storage=storage,
                filter=flt,
                checkpoint_dir=settings.data_dir / ".transfers",
                into_existing=into_existing,
                on_progress=bars,
            )
    except StoreUnavailable as exc:  # transient: a rerun resumes; anything else would recur
        raise type(exc)(f"{exc}; run the same command again to resume") from exc
    resumed = " (resumed)" if report.resumed_from else ""
    click.echo(
        f"copied {report.copied:,} points{resumed} from {source.name!r} to {target.name!r} at "
        f"{target.location}: {report.points:,} on both sides, policy "
        f"{'copied' if report.policy else 'none'}, {report.seconds:.1f}s; storage: "
        f"{storage.describe()}"
    )
