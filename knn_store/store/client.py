"""Collections reached through qdrant-client: a Qdrant server (docker compose, Qdrant Cloud),
or qdrant-client's local mode (a numpy scan meant for tests, which warns past 20,000 points).

What built a collection, and its tuned policy, live in Qdrant's collection metadata, so every
client of the server sees them. Every call is idempotent (upserts carry deterministic ids), so
a call that got no answer is retried with bounded backoff before giving up.

Its length is qdrant-client's surface, one method per operation of ``KnnStore``: what
failures mean lives in ``client_errors``, the shared local-mode clients in
``local_clients``, and the fast search and upsert path in ``wire``.
"""

from __future__ import annotations

import logging
import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from knn_store.errors import (
    CollectionMissing,
    ConfigError,
    StoreAccessDenied,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
)
from knn_store.progress import Counter, Progress, no_progress
from knn_store.store.base import (
    DOMAIN_FIELD,
    FACET_LIMIT,
    INDEXED_FIELDS,
    NEXT_FIELD,
    CollectionMeta,
    Hits,
    KnnStore,
    PointBatch,
    PointFilter,
    int_field,
)
from knn_store.store.client_errors import (
    access_denied,
    describe_error,
    is_transient,
    untrusted_certificate,
)
from knn_store.store.config import TURBO_BITS, SearchOptions, StorageConfig
from knn_store.store.local_clients import LOCAL_CLIENTS
from knn_store.store.records import seal, unseal
from knn_store.store.wire import GrpcWire, RestWire, SearchSpec, Wire

log = logging.getLogger(__name__)
_META_KEY = "knnlm"
_POLICY_KEY = "knnlm_policy"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
_SLOW_CALL_S = 1.0  # a failed call that waited this long is told before it is retried
# Concurrent requests per search batch to a server, unless --search-threads says otherwise:
# with two, the server searches one half while the other is decoded (measured at 303k points,
# k = 1024: gRPC 4.47 -> 3.40 ms/query, REST 3.48 -> 3.31).
SERVER_REQUESTS = 2


def check_server_url(url: str, *, api_key: bool, allow_insecure_api_key: bool) -> None:
    """Refuse a URL without scheme, and an API key sent in clear text to another host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--url {url!r} is not a server URL: give its scheme and host, e.g. "
            "http://localhost:6333 (for qdrant-client's local mode use --backend local)"
        )
    if (
        api_key
        and parts.scheme == "http"
        and parts.hostname not in _LOCAL_HOSTS
        and not allow_insecure_api_key
    ):
        raise ConfigError(
            f"refusing to send the API key unencrypted to {parts.hostname} over http; use "
            "https, or pass --allow-insecure-api-key if the network is trusted"
        )


class QdrantClientStore(KnnStore):
    """A collection through qdrant-client. Build it with ``server(...)`` or ``local(...)``.

    Args:
        client: a ``QdrantClient``.
        collection: collection name.
        location: where it lives, for messages (never holds the API key).
        local: True for qdrant-client's local mode (no HNSW, no payload indexes).
        create: if False, a missing collection raises ``CollectionMissing``.
        retries: attempts after the first for a call that got no answer.
        patience: seconds after which a call and its retries give up (None: no bound).
        search_threads: concurrent search requests per batch (server only; default
            ``SERVER_REQUESTS``).
        wire: the lean transport for searches and upserts (a server); None: qdrant-client's
            models (local mode).
    """

    def __init__(
        self,
        client: Any,
        *,
        collection: str,
        location: str,
        local: bool,
        create: bool = True,
        retries: int = 5,
        patience: float | None = None,
        search_threads: int | None = None,
        wire: Wire | None = None,
    ) -> None:
        super().__init__(collection)
        self._client = client
        self.wire = wire
        self.patience = patience
        self._location = location
        self.local = local
        self.retries = retries
        self.search_threads = search_threads
        self._policy: dict[str, Any] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._server_version: str | None = None
        self.engine_count_is_exact = local  # a server's collection info is approximate
        if self._call("read the collection list", client.collection_exists, collection):
            self._read_collection()
        elif not create:
            raise CollectionMissing(
                f"no collection {collection!r} at {location}; run `knnlm ingest` first"
            )

    @classmethod
    def server(
        cls,
        url: str,
        *,
        collection: str,
        api_key: str | None = None,
        prefer_grpc: bool = False,
        grpc_port: int = 6334,
        ca_cert: str | Path | None = None,
        timeout: int = 60,
        create: bool = True,
        retries: int = 5,
        search_threads: int | None = None,
        allow_insecure_api_key: bool = False,
    ) -> QdrantClientStore:
        """A collection on the Qdrant server at ``url`` (``http(s)://host:port``).

        ``ca_cert`` is a PEM file of the authority to trust for https (REST and gRPC); the
        default trusts the system's CAs.
        """
        from qdrant_client import QdrantClient

        check_server_url(
            url, api_key=api_key is not None, allow_insecure_api_key=allow_insecure_api_key
        )
        tls: dict[str, Any] = {}
        if ca_cert is not None:
            try:
                roots = Path(ca_cert).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read --ca-cert {ca_cert}: {exc.strerror}") from exc
            trusted = ssl.create_default_context(cafile=str(ca_cert))
            tls = {"verify": trusted, "grpc_options": {"root_certificates": roots}}
        with warnings.catch_warnings():  # the insecure-key warning: check_server_url decided
            warnings.simplefilter("ignore")
            # The client's own version check would warn on every command whenever client
            # and server minor versions differ; the store reads the server's version once
            # instead (``server_version``), for ``knnlm info`` and for its messages.
            client = QdrantClient(
                url=url,
                api_key=api_key,
                prefer_grpc=prefer_grpc,
                grpc_port=grpc_port,
                timeout=timeout,
                check_compatibility=False,
                **tls,
            )
        wire: Wire
        if prefer_grpc:
            wire = GrpcWire(lambda: client.grpc_points, collection, timeout=timeout)
        else:
            http, base_url = rest_transport(client)
            wire = RestWire(http, base_url, collection)
        return cls(
            client,
            collection=collection,
            location=url,
            local=False,
            create=create,
            retries=retries,
            patience=timeout,
            search_threads=search_threads,
            wire=wire,
        )

    @classmethod
    def local(
        cls, path: str | Path | None, *, collection: str, create: bool = True, retries: int = 3
    ) -> QdrantClientStore:
        """A collection in qdrant-client's local mode: in a folder, or in memory (None)."""
        from qdrant_client import QdrantClient

        if path is None:
            client, location = QdrantClient(location=":memory:"), ":memory:"
        else:
            folder = Path(path)
            if not create and not (folder / "collection" / collection).is_dir():
                raise CollectionMissing(
                    f"no collection {collection!r} in {folder}; run `knnlm ingest` first"
                )
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"cannot create {folder}: {exc.strerror or exc}") from exc
            client = LOCAL_CLIENTS.acquire(folder)
            location = str(folder)
        return cls(
            client,
            collection=collection,
            location=location,
            local=True,
            create=create,
            retries=retries,
        )

    @property
    def location(self) -> str:
        return self._location

    @property
    def backend(self) -> str:
        return "local" if self.local else "qdrant"

    @property
    def server_version(self) -> str | None:
        """The server's version (None in local mode), asked once."""
        if self.local:
            return None
        if self._server_version is None:
            info = self._call("read the server version", self._client.info)
            self._server_version = str(info.version)
        return self._server_version

    def _server_name(self) -> str:
        return f"Qdrant {self.server_version} at {self._location}"

    def _read_collection(self) -> None:
        info = self._call("read collection info", self._client.get_collection, self.name)
        metadata = info.config.metadata or {}
        raw = metadata.get(_META_KEY)
        if raw is None:
            raise StoreError(
                f"collection {self.name!r} exists but was not made by knnlm; "
                "use another --collection"
            )
        CollectionMeta.check_version(raw)
        self._meta = CollectionMeta.from_dict(unseal(raw, what="collection record"))
        # a key that holds null is damage (knnlm never writes one): unseal refuses it
        self._policy = None
        if _POLICY_KEY in metadata:
            self._policy = unseal(metadata[_POLICY_KEY], what="tuned policy")

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a client call. No answer (or a busy server) is retried with backoff, then
        ``StoreUnavailable``; an error answer is ``StoreError`` at once. The call and its
        retries give up together once ``patience`` seconds have gone by without an answer."""
        delay = 0.5
        deadline = None if self.patience is None else time.monotonic() + self.patience
        for attempt in range(self.retries + 1):
            started = time.monotonic()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                denied = access_denied(exc)
                if denied == "unauthenticated":
                    raise StoreAccessDenied(
                        f"Qdrant at {self._location} refused the API key to {what} (wrong, "
                        "expired or missing): set KNNLM_API_KEY to a key of this server"
                    ) from exc
                if denied == "forbidden":
                    raise StoreAccessDenied(
                        f"the API key may not {what} on Qdrant at {self._location}: it is "
                        f"read-only, or not granted collection {self.name!r}; use a "
                        "read-write key for ingest, tune, push and drops"
                    ) from exc
                if untrusted_certificate(exc):
                    raise StoreUnavailable(
                        f"cannot verify the TLS certificate of Qdrant at {self._location}: "
                        "pass the PEM file of its certificate authority with --ca-cert "
                        "(KNNLM_CA_CERT), or check the URL's host name"
                    ) from exc
                if not is_transient(exc):
                    raise StoreError(
                        f"Qdrant at {self._location} failed to {what}: {describe_error(exc)}"
                    ) from exc
                out_of_time = deadline is not None and time.monotonic() + delay > deadline
                if attempt == self.retries or out_of_time:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise StoreUnavailable(
                        f"cannot reach Qdrant at {self._location} to {what}{tries}: "
                        f"{describe_error(exc)}; is the server running (`docker compose up -d`), "
                        "and are the URL and API key right?"
                    ) from exc
                if time.monotonic() - started >= _SLOW_CALL_S:  # a wait worth telling
                    log.warning(
                        "Qdrant at %s did not answer (%s) to %s; retrying in %.1f s "
                        "(attempt %d of %d)",
                        self._location,
                        describe_error(exc),
                        what,
                        delay,
                        attempt + 2,
                        self.retries + 1,
                    )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    # --- lifecycle -------------------------------------------------------------------------

    def _create(self, meta: CollectionMeta) -> None:
        from qdrant_client import models

        s = meta.storage
        if self.local and s.clustered:
            raise StoreError(
                "shard number, replication and write consistency factors need a Qdrant server"
            )
        try:
            self._call(
                "create the collection",
                self._client.create_collection,
                self.name,
                vectors_config=models.VectorParams(
                    size=meta.dim,
                    distance=models.Distance.EUCLID,
                    datatype=models.Datatype.FLOAT16 if s.datatype == "float16" else None,
                    on_disk=s.vectors_on_disk,
                ),
                # Bulk load first, index afterwards: finalize() sets m.
                hnsw_config=models.HnswConfigDiff(
                    m=0,
                    ef_construct=s.hnsw_ef_construct,
                    on_disk=s.index_on_disk,
                    full_scan_threshold=s.indexing_threshold_kb,
                ),
                quantization_config=_quantization_config(s),
                optimizers_config=models.OptimizersConfigDiff(
                    indexing_threshold=s.indexing_threshold_kb
                )
                if s.indexing_threshold_kb is not None
                else None,
                shard_number=s.shard_number,
                replication_factor=s.replication_factor,
                write_consistency_factor=s.write_consistency_factor,
                metadata={_META_KEY: seal(meta.to_dict())},
            )
        except StoreAccessDenied:
            raise
        except StoreError as exc:
            # Another worker may have created it first (sharded ingest): use theirs.
            if not self._call(
                "read the collection list", self._client.collection_exists, self.name
            ):
                if self.local or isinstance(exc, StoreUnavailable):
                    raise
                raise ConfigError(
                    f"{self._server_name()} refused the storage settings "
                    f"({s.describe()}; quantization {s.quantization}): "
                    f"{describe_error(exc.__cause__ or exc)}"
                ) from exc
            self._read_collection()
            assert self._meta is not None
            self._meta.check_compatible(meta, collection=self.name)
            return
        # Before the first point: a server in strict mode (as on Qdrant Cloud) refuses
        # filters, counts and facets over fields without an index.
        for field in INDEXED_FIELDS:
            schema = models.KeywordIndexParams(
                type=models.KeywordIndexType.KEYWORD, is_tenant=field == DOMAIN_FIELD
            )
            with warnings.catch_warnings():  # local mode ignores payload indexes, and says so
                warnings.simplefilter("ignore")
                self._call(
                    "index payload",
                    self._client.create_payload_index,
                    self.name,
                    field,
                    schema,
                    wait=True,
                )

    def _write_meta(self, meta: CollectionMeta) -> None:
        # Qdrant merges metadata keys: the tuned policy stays as it is.
        self._call(
            "save the collection record",
            self._client.update_collection,
            self.name,
            metadata={_META_KEY: seal(meta.to_dict())},
        )

    def upsert(self, batch: PointBatch) -> None:
        from qdrant_client import models

        if self.wire is not None:
            self._call("upsert points", self.wire.upsert, batch)
            return
        self._call(
            "upsert points",
            self._client.upsert,
            self.name,
            points=models.Batch(
                ids=batch.ids, vectors=batch.keys.tolist(), payloads=batch.payloads
            ),
            wait=True,
        )

    def finalize(self) -> None:
        from qdrant_client import models

        if self._meta is None or self.local:
            return
        info = self._call("read collection info", self._client.get_collection, self.name)
        if info.config.hnsw_config.m == self._meta.storage.hnsw_m:
            return  # already on: an update would restart the server's optimizers for nothing
        self._call(
            "enable HNSW",
            self._client.update_collection,
            self.name,
            hnsw_config=models.HnswConfigDiff(m=self._meta.storage.hnsw_m),
        )

    def drop(self) -> None:
        self._call("delete the collection", self._client.delete_collection, self.name)
        self._meta, self._policy = None, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self.local and self._location != ":memory:":
            LOCAL_CLIENTS.release(Path(self._location))
        else:
            self._client.close()

    def load_policy(self) -> dict[str, Any] | None:
        return self._policy

    def save_policy(self, policy: dict[str, Any]) -> None:
        if self._meta is None:
            raise CollectionMissing(f"collection {self.name!r} is empty; run `knnlm ingest` first")
        # Qdrant merges metadata keys, so this leaves the collection's own record alone.
        self._call(
            "save the policy",
            self._client.update_collection,
            self.name,
            metadata={_POLICY_KEY: seal(policy)},
        )
        self._policy = policy

    # --- primitives ------------------------------------------------------------------------

    def _search(
        self, queries: np.ndarray, *, k: int, options: SearchOptions, filter: PointFilter
    ) -> Hits:
        from qdrant_client import models

        assert self._meta is not None
        quantized = self._meta.storage.quantization != "none"
        if self.wire is not None:
            spec = SearchSpec(
                limits=[k] * len(queries),
                hnsw_ef=options.ef(k),
                exact=options.exact,
                quantization=(
                    options.exact,
                    options.rescores(self._meta.storage),
                    options.oversampling,
                )
                if quantized
                else None,
                filter=filter,
            )
            return self._wire_search(queries, spec, what="search")
        # local mode: always an exact scan, and it warns about parameters it cannot use
        flt = _filter(filter)
        requests = [
            models.QueryRequest(
                query=row.tolist(), limit=k, filter=flt, with_payload=False, with_vector=False
            )
            for row in queries
        ]
        results = self._call(
            "search", self._client.query_batch_points, self.name, requests=requests
        )
        return Hits.from_rows(
            [[p.id for p in r.points] for r in results],
            [[p.score for p in r.points] for r in results],
        )

    def _wire_search(self, queries: np.ndarray, spec: SearchSpec, *, what: str) -> Hits:
        """One batch through the lean transport, split over ``search_threads`` concurrent
        requests where set (the server searches one part while the last is decoded)."""
        wire = self.wire
        assert wire is not None

        def run(rows: slice) -> Hits:
            part = replace(
                spec,
                limits=spec.limits[rows],
                ids=None if spec.ids is None else spec.ids[rows],
            )
            return self._call(what, wire.search, queries[rows], part)

        threads = min(self.search_threads or SERVER_REQUESTS, len(queries))
        if threads <= 1:
            return run(slice(None))
        if self._pool is None:
            workers = self.search_threads or SERVER_REQUESTS
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="knnlm-search")
        bounds = np.linspace(0, len(queries), threads + 1).astype(int).tolist()
        parts = list(self._pool.map(run, [slice(a, b) for a, b in pairwise(bounds)]))
        return Hits.concat(parts)

    def _score_ids(self, queries: np.ndarray, ids: list[Sequence[Any]], *, k: int) -> Hits:
        from qdrant_client import models

        assert self._meta is not None
        limits = [min(k, len(row)) for row in ids]
        if self.wire is not None:  # the original keys, whatever the quantization
            quantized = self._meta.storage.quantization != "none"
            spec = SearchSpec(
                limits=limits,
                exact=True,
                quantization=(True, None, None) if quantized else None,
                ids=ids,
                with_next=True,
            )
            return self._wire_search(queries, spec, what="score points")
        requests = [  # local mode scans the original keys
            models.QueryRequest(
                query=query.tolist(),
                limit=limit,
                filter=models.Filter(must=[models.HasIdCondition(has_id=[str(i) for i in row])]),
                with_payload=[NEXT_FIELD],
                with_vector=False,
            )
            for query, row, limit in zip(queries, ids, limits, strict=True)
        ]
        results = self._call(
            "score points", self._client.query_batch_points, self.name, requests=requests
        )
        return Hits.from_rows(
            [[p.id for p in r.points] for r in results],
            [[p.score for p in r.points] for r in results],
            [[int_field(p.payload, NEXT_FIELD) for p in r.points] for r in results],
        )

    def _retrieve(
        self, ids: list[Any], *, with_keys: bool, with_payload: bool | list[str]
    ) -> list[Any]:
        return self._call(
            "read points",
            self._client.retrieve,
            self.name,
            ids=[str(i) for i in ids],
            with_payload=with_payload,
            with_vectors=with_keys,
        )

    def _scroll(
        self, *, filter: PointFilter, limit: int, offset: str | None
    ) -> tuple[list[Any], Any]:
        return self._call(
            "read points",
            self._client.scroll,
            self.name,
            scroll_filter=_filter(filter),
            limit=limit,
            offset=offset,
            with_payload=True,
            with_vectors=True,
        )

    def _count(self, filter: PointFilter) -> int:
        return self._call(
            "count", self._client.count, self.name, count_filter=_filter(filter), exact=True
        ).count

    def _facet(self, field: str) -> dict[str, int]:
        facets = self._call(
            f"count points per {field}",
            self._client.facet,
            self.name,
            key=field,
            limit=FACET_LIMIT,
            exact=True,
        )
        # a server keeps a dropped domain's value in its index, counted 0
        return {str(hit.value): hit.count for hit in facets.hits if hit.count > 0}

    def _delete(self, filter: PointFilter) -> None:
        from qdrant_client import models

        self._call(
            "delete points",
            self._client.delete,
            self.name,
            points_selector=models.FilterSelector(filter=_filter(filter)),
            wait=True,
        )

    def indexed_fields(self) -> set[str]:
        if self.local:  # local mode scans and keeps no payload index; nothing is missing
            return set(INDEXED_FIELDS)
        info = self._call("read collection info", self._client.get_collection, self.name)
        return set(info.payload_schema or {})

    def engine_storage(self) -> dict[str, Any] | None:
        """The storage settings as the server itself reports them (``knnlm info`` shows
        them beside the record, ``check`` compares the two); None in local mode."""
        if self.local:
            return None
        info = self._call("read collection info", self._client.get_collection, self.name)
        return _storage_from_config(info.config)

    def engine_points(self) -> int:
        info = self._call("read collection info", self._client.get_collection, self.name)
        if info.points_count is None:
            raise StoreDamaged(f"Qdrant reports no point count for {self.name!r}")
        return int(info.points_count)

    # --- snapshots (knn_store.store.snapshot) ----------------------------------------------

    def collection_exists(self, name: str) -> bool:
        """Whether collection ``name`` exists where this one lives, whatever it holds."""
        return bool(self._call("read the collection list", self._client.collection_exists, name))

    def download_snapshot(self, path: Path, *, on_progress: Progress = no_progress) -> str:
        """Have the server snapshot this collection (points, config and metadata: the record
        and the policy), stream the file into ``path`` and delete it on the server. Returns
        its sha256, checked against the server's."""
        import hashlib

        from qdrant_client.http.exceptions import UnexpectedResponse

        if self.local:
            raise StoreError("qdrant-client's local mode has no server snapshots")
        made = self._call("create a snapshot", self._client.create_snapshot, self.name, wait=True)
        if made is None:
            raise StoreError(f"Qdrant at {self._location} made no snapshot of {self.name!r}")
        http, base_url = rest_transport(self._client)
        url = f"{base_url.rstrip('/')}/collections/{quote(self.name, safe='')}/snapshots/"
        url += quote(made.name, safe="")

        def fetch() -> str:
            digest = hashlib.sha256()
            counter = Counter(on_progress, "download")
            # streamed through the REST client's own httpx client: a snapshot may not fit
            # in memory, which the generated `get_snapshot` would need
            with http.stream("GET", url) as response, path.open("wb") as out:
                if response.status_code != 200:
                    response.read()
                    raise UnexpectedResponse.for_response(response)
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    counter.add(len(chunk))
            return digest.hexdigest()

        try:
            sha256 = self._call("download the snapshot", fetch)
        finally:
            self._call(
                "delete the snapshot on the server",
                self._client.delete_snapshot,
                self.name,
                made.name,
                wait=True,
            )
        if made.checksum and made.checksum != sha256:
            raise StoreError(
                f"the snapshot of {self.name!r} downloaded from {self._location} does not match "
                "the server's checksum; run the command again"
            )
        return sha256

    def upload_snapshot(self, path: Path, *, collection: str, checksum: str) -> None:
        """Upload the Qdrant collection snapshot at ``path`` to become ``collection`` on this
        server, replacing that collection where it exists (Qdrant's own recovery)."""
        from qdrant_client import models

        if self.local:
            raise StoreError("qdrant-client's local mode cannot recover server snapshots")

        def upload() -> None:
            with path.open("rb") as snapshot:
                self._client.http.snapshots_api.recover_from_uploaded_snapshot(
                    collection_name=collection,
                    wait=True,
                    priority=models.SnapshotPriority.SNAPSHOT,
                    checksum=checksum,
                    snapshot=snapshot,
                )

        self._call(f"recover collection {collection!r} from a snapshot", upload)
        if collection == self.name:
            self._read_collection()


# --- helpers -------------------------------------------------------------------------------


def rest_transport(client: Any) -> tuple[Any, str]:
    """The ``httpx.Client`` under a server's ``QdrantClient`` (it sends the API key header
    and verifies TLS as the client was told to) and the server's REST base URL.

    qdrant-client exposes no public way to send a request body of our own, so this is the
    one place that reaches into its REST client; a client version that moves it fails here,
    in one line, rather than on some later call.
    """
    import httpx

    rest = getattr(getattr(client, "http", None), "client", None)
    http, host = getattr(rest, "_client", None), getattr(rest, "host", None)
    if not isinstance(http, httpx.Client) or not isinstance(host, str):
        raise StoreError(
            "this qdrant-client version keeps its REST transport elsewhere; install a "
            "qdrant-client that knnlm supports (see pyproject.toml)"
        )
    return http, host


def _quantization_config(s: StorageConfig) -> Any:
    from qdrant_client import models

    if s.quantization == "none":
        return None
    if s.quantization == "int8":
        return models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(
                type=models.ScalarType.INT8, quantile=0.99, always_ram=True
            )
        )
    if s.quantization == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    bits = models.TurboQuantBitSize("bits" + TURBO_BITS[s.quantization].replace(".", "_"))
    return models.TurboQuantization(
        turbo=models.TurboQuantQuantizationConfig(bits=bits, always_ram=True)
    )


def _storage_from_config(config: Any) -> dict[str, Any]:
    """A server's collection config read back into ``StorageConfig``'s fields."""
    from qdrant_client import models

    vectors = config.params.vectors
    assert isinstance(vectors, models.VectorParams), "knnlm collections have one vector"
    hnsw, quant = config.hnsw_config, config.quantization_config
    if isinstance(quant, models.ScalarQuantization):
        quantization = "int8"
    elif isinstance(quant, models.BinaryQuantization):
        quantization = "binary"
    elif isinstance(quant, models.TurboQuantization):
        bits = getattr(quant.turbo.bits, "value", quant.turbo.bits) or "bits4"
        quantization = "turbo" + str(bits).removeprefix("bits").replace("_", ".")
    elif quant is None:
        quantization = "none"
    else:
        quantization = type(quant).__name__
    datatype = getattr(vectors.datatype, "value", vectors.datatype) or "float32"
    return {
        "datatype": str(datatype),
        "quantization": quantization,
        "vectors_on_disk": bool(vectors.on_disk),
        "index_on_disk": bool(hnsw.on_disk),
        "hnsw_m": hnsw.m,
        "hnsw_ef_construct": hnsw.ef_construct,
        "indexing_threshold_kb": config.optimizer_config.indexing_threshold,
        "shard_number": config.params.shard_number,
        "replication_factor": config.params.replication_factor,
        "write_consistency_factor": config.params.write_consistency_factor,
    }


def _filter(flt: PointFilter) -> Any:
    from qdrant_client import models

    if not flt:
        return None
    return models.Filter(
        must=[
            models.FieldCondition(key=key, match=models.MatchAny(any=values))
            for key, values in flt.conditions()
        ]
    )
