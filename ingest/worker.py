"""The ingest worker: text -> LM keys -> (key, next token) points in the store.

Two streaming passes over the corpus, so memory stays bounded however large it is:

1. plan: read and tokenize every document once, checking it (bad input fails here, before
   anything is written) and counting what is left to do; the store's points per document
   come from one facet request;
2. write: run the LM over the documents still to do, batch by batch, while a writer thread
   upserts the previous batch and flushes now and then, so the write-ahead log stays small.

Resumable by construction: point ids are a function of (domain, text, position, token), so
writing a point twice leaves one point, and a document whose points are all in the store is
skipped. Kill it at any moment, run it again, and the store ends exactly as after a clean
run. ``shard=(i, n)`` keeps the documents whose hash is i modulo n: n workers together
write exactly what one would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ingest.corpus import Document
from knn_store import CorpusError, KnnStore, LanguageModel, PointBatch, sliding_windows
from knn_store.errors import KnnlmError, StoreError, StoreUnavailable
from knn_store.progress import Progress, no_progress
from knn_store.store.base import (
    CONTEXT_FIELD,
    DOC_FIELD,
    DOMAIN_FIELD,
    NEXT_FIELD,
    OFFSET_FIELD,
    SOURCE_FIELD,
)
from knn_store.store.config import StorageConfig
from knn_store.store.point_ids import document_hash, document_key, make_point_ids
from knn_store.windows import Window

CONTEXT_TOKENS = 24  # tokens of text kept with each point, ending at its key's position
FLUSH_EVERY = 50_000  # points between flushes: bounds the write-ahead log


@dataclass(frozen=True)
class _Tokenized:
    document: Document
    ids: np.ndarray  # int64 [n], with the BOS prefix
    doc_hash: int

    @property
    def key(self) -> str:
        return document_key(self.doc_hash)

    @property
    def n_points(self) -> int:
        return max(len(self.ids) - 1, 0)


@dataclass(frozen=True)
class IngestReport:
    documents: int  # distinct documents of this shard
    resumed: int  # documents already complete in the store, skipped
    other_shards: int  # documents left to the other shards
    tokens: int  # positions run through the LM in this run
    points_before: int
    points_after: int
    seconds: float  # wall time of the LM + write phase
    index_seconds: float  # time to flush and build the index

    @property
    def points_added(self) -> int:
        return self.points_after - self.points_before

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class IngestWorker:
    """Runs the LM over documents and upserts their points, writing while the LM computes.

    Args:
        lm: the language model (its key type decides what is stored).
        store: the target collection; created on first use with ``storage``.
        domain: tag of every point written (filterable at search time).
        window, stride: sliding windows, see ``knn_store.windows``.
        batch_size: windows per LM forward.
        upsert_batch: points per upsert request.
        storage: how a new collection stores its keys.
        shard: (i, n): this worker takes the documents whose hash is i modulo n.
        on_progress: told the documents read (stage ``read``), the tokens stored
            (``ingest``, out of the plan's total) and the final indexing (``index``).
    """

    def __init__(
        self,
        lm: LanguageModel,
        store: KnnStore,
        *,
        domain: str,
        window: int,
        stride: int,
        batch_size: int = 1,
        upsert_batch: int = 512,
        storage: StorageConfig | None = None,
        shard: tuple[int, int] = (0, 1),
        flush_every: int = FLUSH_EVERY,
        on_progress: Progress = no_progress,
    ) -> None:
        if not domain:
            raise ValueError("`domain` must be a non-empty string")
        if window > lm.max_positions:
            raise ValueError(
                f"`window` ({window}) exceeds the model's context ({lm.max_positions})"
            )
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
        self.lm = lm
        self.store = store
        self.domain = domain
        self.window = window
        self.stride = stride
        self.batch_size = batch_size
        self.upsert_batch = upsert_batch
        self.storage = storage or StorageConfig()
        self.shard = shard
        self.flush_every = flush_every
        self.on_progress = on_progress

    def run(self, documents: Iterable[Document]) -> IngestReport:
        """Ingest ``documents`` in one pass: each is read and tokenized once, skipped when
        the store already holds all its points, else run through the LM and written.

        A failure after some points were written says how many, and a rerun resumes.
        """
        existing = self.store.meta
        if existing is not None:
            self.store.probe()  # never write into a store that cannot be read back
            # the model must be the one that built it (an older record keeps its scheme)
            self.store.ensure_collection(
                self.lm.collection_meta(self.storage, scheme=existing.fingerprint_scheme)
            )
        stored = self.store.doc_counts()
        points_before = self.store.count() if existing is not None else 0
        plan = _Plan()
        started = time.perf_counter()
        writer = _BackgroundWriter(self.store, flush_every=self.flush_every)
        done = 0
        try:
            with writer:
                buffer: PointBatch | None = None  # points computed, not yet sent
                for batch in self._point_batches(self._todo(documents, stored, plan)):
                    if self.store.meta is None:  # a new collection, made by the first write
                        self.store.ensure_collection(self.lm.collection_meta(self.storage))
                    done += len(batch)
                    self.on_progress("ingest", done, None)
                    buffer = batch if buffer is None else PointBatch.concat([buffer, batch])
                    while len(buffer) >= self.upsert_batch:
                        writer.put(buffer[: self.upsert_batch])
                        buffer = buffer[self.upsert_batch :]
                if buffer is not None and len(buffer):
                    writer.put(buffer)
        except KnnlmError as exc:
            if not writer.written and not isinstance(exc, StoreError):
                raise  # bad input before any write: nothing to tell about the store
            # A server out of reach, or a write the engine failed, may succeed on a rerun;
            # damage, a refused key or a mismatch (the subclasses) would fail the same way.
            hint = (
                "; run the same command again to resume (stored documents are skipped)"
                if type(exc) is StoreError or isinstance(exc, StoreUnavailable)
                else "; once that is fixed, a rerun resumes (stored documents are skipped)"
            )
            raise type(exc)(
                f"{exc}. {writer.written:,} points were written before it failed{hint}"
            ) from exc
        if plan.documents + plan.other_shards == 0:
            raise CorpusError("the corpus holds no documents")
        if plan.points == 0 and plan.other_shards == 0:
            raise CorpusError("the corpus yields no tokens to store")
        seconds = time.perf_counter() - started

        started = time.perf_counter()
        if self.store.meta is not None:
            self.on_progress("index", 0, None)
            try:
                self.store.finalize()
            except KnnlmError as exc:
                raise type(exc)(
                    f"{exc}. {writer.written:,} points were written, but the search index "
                    "and the record of the write were not finished; once that is fixed, "
                    "a rerun finishes them"
                ) from exc
        index_seconds = time.perf_counter() - started
        return IngestReport(
            documents=plan.documents,
            resumed=plan.resumed,
            other_shards=plan.other_shards,
            tokens=plan.tokens,
            points_before=points_before,
            points_after=self.store.count() if self.store.meta is not None else 0,
            seconds=seconds,
            index_seconds=index_seconds,
        )

    # --- the one pass ----------------------------------------------------------------------

    def _documents(self, documents: Iterable[Document]) -> Iterator[_Tokenized | int]:
        """This shard's distinct documents, tokenized; an int (a hash) for one of another
        shard. Identical texts give identical points, so each is kept once."""
        seen: set[int] = set()  # 8 bytes per document, not per token
        for doc in documents:
            h = document_hash(self.domain, doc.text)
            if h in seen:
                continue
            seen.add(h)
            if h % self.shard[1] != self.shard[0]:
                yield h
                continue
            yield _Tokenized(doc, self.lm.encode(doc.text), h)

    def _todo(
        self, documents: Iterable[Document], stored: dict[str, int], plan: _Plan
    ) -> Iterator[_Tokenized]:
        """The documents still to write, counting every one read into ``plan``."""
        for doc in self._documents(documents):
            if isinstance(doc, int):
                plan.other_shards += 1
                continue
            plan.documents += 1
            plan.points += doc.n_points
            if stored.get(doc.key) == doc.n_points:
                plan.resumed += 1
            elif doc.n_points:
                plan.tokens += doc.n_points
                yield doc

    def _point_batches(self, docs: Iterable[_Tokenized]) -> Iterator[PointBatch]:
        """One PointBatch per LM forward of up to ``batch_size`` windows."""
        group: list[tuple[_Tokenized, Window]] = []
        for doc in docs:
            for win in sliding_windows(len(doc.ids), window=self.window, stride=self.stride):
                group.append((doc, win))
                if len(group) == self.batch_size:
                    yield self._forward(group)
                    group = []
        if group:
            yield self._forward(group)

    def _forward(self, group: list[tuple[_Tokenized, Window]]) -> PointBatch:
        # padded as eval pads: the stored keys are the keys eval computes, to the bit
        outs, _ = self.lm.forward_windows(
            [(d.ids, w) for d, w in group], cap=self.window, with_logits=False
        )
        keys = np.concatenate([o.keys.cpu().numpy() for o in outs])  # [m, d]

        ids: list[str] = []
        payloads: list[dict[str, object]] = []
        for doc, win in group:  # per window, not per token
            positions = win.positions  # [m] absolute positions scored here
            tokens = doc.ids[positions + 1]  # [m] each position's next token
            ids += make_point_ids(doc.doc_hash, positions, tokens)
            base = {
                DOMAIN_FIELD: self.domain,
                DOC_FIELD: doc.key,
                SOURCE_FIELD: doc.document.source,
            }
            # skip the BOS prefix: it has no text
            first = np.maximum(positions - CONTEXT_TOKENS + 1, len(self.lm.prefix_ids))
            contexts = self.lm.tokenizer.batch_decode(
                [doc.ids[a : p + 1].tolist() for a, p in zip(first, positions, strict=True)]
            )
            payloads += [
                {**base, OFFSET_FIELD: int(p), CONTEXT_FIELD: c}
                for p, c in zip(positions, contexts, strict=True)
            ]
            if self.store.meta is not None and self.store.meta.successors:
                # a collection linked by `rebuild --successors`: each point names its
                # successor's value (the token two places on), -1 at the document's end
                after = np.append(doc.ids, -1)[np.minimum(positions + 2, len(doc.ids))]
                for payload, nxt in zip(payloads[-len(positions) :], after, strict=True):
                    payload[NEXT_FIELD] = int(nxt)
        return PointBatch(ids=ids, keys=keys, payloads=payloads)


@dataclass
class _Plan:
    documents: int = 0
    resumed: int = 0
    other_shards: int = 0
    points: int = 0  # points of this shard's documents
    tokens: int = 0  # positions still to run through the LM


class _BackgroundWriter:
    """Upserts on a thread so the LM computes the next batch meanwhile, and flushes every
    ``flush_every`` points, which lets the engine trim its write-ahead log.

    The queue is short (memory stays bounded); an upsert error surfaces on the next ``put``
    or at exit. On exit every queued batch is written before returning.
    """

    _DONE = object()

    def __init__(self, store: KnnStore, *, flush_every: int, depth: int = 4) -> None:
        self._store = store
        self._flush_every = flush_every
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="knnlm-upsert", daemon=True)
        self.written = 0  # points acknowledged by the store

    def __enter__(self) -> _BackgroundWriter:
        self._thread.start()
        return self

    def _loop(self) -> None:
        unflushed = 0
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is not None:
                continue  # drain: the main thread raises the error
            try:
                assert isinstance(item, PointBatch)
                self._store.upsert(item)
                self.written += len(item)
                unflushed += len(item)
                if unflushed >= self._flush_every:
                    self._store.flush()
                    unflushed = 0
            except BaseException as exc:  # surfaced in the main thread
                self._error = exc

    def put(self, batch: PointBatch) -> None:
        self._raise_if_failed()
        self._queue.put(batch)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(self._DONE)
        self._thread.join()
        if exc_info[0] is None:
            self._raise_if_failed()
