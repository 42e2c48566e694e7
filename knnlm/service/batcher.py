"""The model's one worker thread, and how it batches the requests waiting for it.

HTTP handlers never touch the LM: they submit jobs and wait on futures. The worker owns the
session's LM and store. Each round it takes the oldest waiting job and every other waiting
job that can share its work, up to ``max_batch`` windows (scoring) or rows (generation):

- score jobs with the same kNN options, and explain jobs with the same display options,
  become one ``KnnLM.score`` call over all their texts, so their windows share LM forwards
  and batched searches; the rows come back apart by ``LMView.sequence``;
- completion jobs become one ``decode`` call: one forward and one search per step for every
  row, each row sampling with its own seed, streaming its tokens to its own request.

Rows of a batch do not see each other (right-padded windows, left-padded prompts), so a
request gets the answer it would get alone, and the one ``knnlm eval`` or ``knnlm generate``
gives. When the oldest job arrived less than ``max_wait`` ago and the batch is not full,
the worker waits that long for company.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from knn_store.errors import ConfigError, CorpusError, KnnlmError
from knn_store.knn_lm import perplexity
from knn_store.windows import sliding_windows

if TYPE_CHECKING:
    from knn_store.explain import TokenExplanation
    from knn_store.generation import Sampling, Step
    from knn_store.knn_lm import KnnLM
    from knn_store.session import Session

log = logging.getLogger(__name__)


class ServiceUnavailable(KnnlmError):
    """Too many requests are waiting, or the server is shutting down: retry later."""


@dataclass(frozen=True)
class KnnOptions:
    """Per-request retrieval settings, meaning what the same ``knnlm eval`` flags mean;
    None keeps the server's."""

    lmbda: float | None = None
    temperature: float | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class TokenScores:
    """One text scored: per predicted token, in order (arrays of length ``tokens``)."""

    targets: np.ndarray  # int64, the token that came next
    base_log_probs: np.ndarray  # float32, log p_LM(target)
    knn_log_probs: np.ndarray  # float32, the kNN-LM's log p(target); -inf where it gave 0
    lambdas: np.ndarray  # float32
    searched: np.ndarray  # bool, False where the retrieval gate skipped the search

    @property
    def tokens(self) -> int:
        return len(self.targets)

    @property
    def base_nll(self) -> float:
        return -float(np.sum(self.base_log_probs, dtype=np.float64))

    @property
    def knn_nll(self) -> float:
        return -float(np.sum(self.knn_log_probs, dtype=np.float64))

    @property
    def base_perplexity(self) -> float:
        return perplexity(self.base_nll, self.tokens)

    @property
    def knn_perplexity(self) -> float:
        return perplexity(self.knn_nll, self.tokens)


@dataclass
class BatchStats:
    """What the worker has done: ``batches`` below ``requests`` means requests shared work."""

    requests: int = 0  # jobs run (not counting refused or cancelled ones)
    batches: int = 0  # rounds of the worker, each one score, explain or decode call
    lm_forwards: int = 0  # LM forward passes (windows batches, or decoding steps)
    largest_batch: int = 0  # most jobs in one round

    def to_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "lm_forwards": self.lm_forwards,
            "largest_batch": self.largest_batch,
        }


@dataclass(eq=False)
class _Job:
    kind: str  # "score", "explain" or "complete"
    group: Hashable  # jobs of one group can run in one call
    size: int  # windows (score, explain) or rows (complete) it adds to a batch
    ids: np.ndarray  # int64 token ids, BOS first
    args: Any  # KnnOptions, (top, neighbours) or Sampling
    on_step: Callable[[Step], bool | None] | None = None
    top_logprobs: int = 0
    future: Future[Any] = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs score, explain and completion jobs on one thread, batching what waits together.

    Args:
        session: the open session; from ``start()`` on, only the worker uses its LM.
        max_batch: windows (scoring) or rows (generation) per batch at most.
        max_wait: seconds the oldest job may wait for others to join an unfilled batch.
        max_pending: jobs allowed to wait; past it, submissions get ``ServiceUnavailable``.
    """

    def __init__(
        self,
        session: Session,
        *,
        max_batch: int = 8,
        max_wait: float = 0.005,
        max_pending: int = 1024,
    ) -> None:
        if max_batch < 1 or max_pending < 1 or not 0 <= max_wait < math.inf:
            raise ValueError("max_batch and max_pending must be positive, max_wait >= 0")
        self.session = session
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_pending = max_pending
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet taken into a batch
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="knnlm-model", daemon=True)

    # --- the handlers' side ----------------------------------------------------------------

    def score(self, ids: np.ndarray, options: KnnOptions = KnnOptions()) -> Future[TokenScores]:
        """Score every predicted token of ``ids`` (``session.encode``), as eval would."""
        self.knn_lm_for(options)  # bad options fail here, not inside someone's batch
        return self._submit("score", ("score", options), self._windows(ids), ids, options)

    def explain(
        self, ids: np.ndarray, *, top: int = 3, neighbours: int = 3
    ) -> Future[list[TokenExplanation]]:
        """``explain_text``'s rows for ``ids``, one per predicted token."""
        group = ("explain", top, neighbours)
        return self._submit("explain", group, self._windows(ids), ids, (top, neighbours))

    def complete(
        self,
        ids: np.ndarray,
        sampling: Sampling,
        *,
        on_step: Callable[[Step], bool | None] | None = None,
        top_logprobs: int = 0,
    ) -> Future[list[int]]:
        """The new tokens after prompt ``ids``. ``on_step(step)`` sees each token as it comes
        (with its ln p and the ``top_logprobs`` likeliest tokens), on the worker thread: it
        must be quick; returning False ends the row there (a stop string, a client gone), and
        the future then holds the tokens so far."""
        lm = self.session.lm
        if len(ids) == 0:
            raise ConfigError("a prompt needs at least one token")
        if len(ids) + sampling.max_new_tokens > lm.max_positions:
            raise ConfigError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({sampling.max_new_tokens}) "
                f"exceeds the model's context ({lm.max_positions} tokens)"
            )
        job = _Job("complete", ("complete",), 1, ids, sampling, on_step, top_logprobs)
        return self._enqueue(job)

    def knn_lm_for(self, options: KnnOptions) -> KnnLM:
        """The session's kNN-LM with a request's ``options`` (``Session.with_overrides``)."""
        return self.session.with_overrides(
            lmbda=options.lmbda, temperature=options.temperature, top_k=options.top_k
        )

    def _windows(self, ids: np.ndarray) -> int:
        knn_lm = self.session.knn_lm
        n = sum(1 for _ in sliding_windows(len(ids), window=knn_lm.window, stride=knn_lm.stride))
        if n == 0:
            raise CorpusError("nothing to score: the text is shorter than 2 tokens")
        return n

    def _submit(
        self,
        kind: str,
        group: Hashable,
        size: int,
        ids: np.ndarray,
        args: Any,
    ) -> Future[Any]:
        return self._enqueue(_Job(kind, group, size, ids, args))

    def _enqueue(self, job: _Job) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the server is shutting down")
            if self._waiting >= self.max_pending:
                raise ServiceUnavailable(
                    f"{self._waiting} requests are already waiting; retry in a moment"
                )
            if not self._thread.is_alive():
                if self._thread.ident is not None:
                    raise ServiceUnavailable("the model worker stopped; restart the server")
                self._thread.start()
            self._waiting += 1
            self._queue.put(job)
        return job.future

    def start(self) -> None:
        """Start the worker now (submitting a job also does)."""
        with self._lock:
            if self._thread.ident is None and not self._closed:
                self._thread.start()

    @property
    def healthy(self) -> bool:
        """Open, and the worker (once started) is running."""
        return not self._closed and (self._thread.ident is None or self._thread.is_alive())

    def close(self, timeout: float | None = None) -> None:
        """Finish the batch in hand, refuse what still waits, and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._thread.ident is not None
        if started:
            self._queue.put(None)
            self._thread.join(timeout)
        else:
            self._refuse_queued()

    # --- the worker's side -----------------------------------------------------------------

    def _run(self) -> None:
        pending: deque[_Job] = deque()
        closing = False
        while not closing:
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
            closing = self._gather(pending)
            batch = self._take(pending)
            if batch:
                self._run_batch(batch)
        for job in pending:
            _settle(job.future, error=ServiceUnavailable("the server is shutting down"))
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _settle(job.future, error=ServiceUnavailable("the server is shutting down"))

    def _gather(self, pending: deque[_Job]) -> bool:
        """Move what was submitted into ``pending``, waiting up to ``max_wait`` after the
        oldest job's arrival while its batch is not full. True once ``close()`` was called."""
        deadline = pending[0].queued + self.max_wait
        while True:
            timeout = deadline - time.monotonic()
            try:
                if timeout > 0 and not self._full(pending):
                    job = self._queue.get(timeout=timeout)
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            pending.append(job)

    def _full(self, pending: deque[_Job]) -> bool:
        group = pending[0].group
        return sum(j.size for j in pending if j.group == group) >= self.max_batch

    def _take(self, pending: deque[_Job]) -> list[_Job]:
        """The oldest job and the later ones of its group that fit, in arrival order;
        jobs whose client gave up are dropped."""
        batch: list[_Job] = []
        size = 0
        rest: deque[_Job] = deque()
        while pending:
            job = pending.popleft()
            fits = not batch or (job.group == batch[0].group and size + job.size <= self.max_batch)
            if not fits:
                rest.append(job)
                continue
            with self._lock:
                self._waiting -= 1
            if job.future.set_running_or_notify_cancel():  # False: cancelled while waiting
                batch.append(job)
                size += job.size
        pending.extend(rest)
        return batch

    def _run_batch(self, batch: list[_Job]) -> None:
        kind = batch[0].kind
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        try:
            if kind == "complete":
                self._complete(batch)
            else:
                self._score(batch, explain=kind == "explain")
        except KnnlmError as exc:
            for job in batch:
                _settle(job.future, error=exc)
        except Exception as exc:
            log.exception("a batch of %d %s requests failed", len(batch), kind)
            for job in batch:
                _settle(job.future, error=exc)

    def _score(self, batch: list[_Job], *, explain: bool) -> None:
        """One ``KnnLM.score`` over every text of the batch, split back per text."""
        from knn_store.explain import explain_scored

        windows = sum(job.size for job in batch)
        if explain:  # full distributions: keep the CLI's windows per forward, for memory
            knn_lm = self.session.knn_lm
            per_forward = min(windows, self.session.settings.batch_size)
        else:
            knn_lm = self.knn_lm_for(batch[0].args)
            per_forward = min(windows, self.max_batch)
        runner = knn_lm.with_options(batch_size=per_forward)
        rows: list[list[Any]] = [[] for _ in batch]
        for scored in runner.score([job.ids for job in batch], full=explain):
            self.stats.lm_forwards += scored.lm.forwards
            sequence = scored.lm.sequence  # [m], index into the batch
            if explain:
                top, neighbours = batch[0].args
                found = explain_scored(runner, scored, top=top, show_neighbours=neighbours)
                for row, explanation in zip(sequence, found, strict=True):
                    rows[row].append(explanation)
                continue
            columns = (
                scored.lm.position,
                scored.lm.targets.cpu().numpy(),
                scored.lm.lm_target_log_prob.cpu().numpy(),
                scored.log_prob.cpu().numpy(),
                scored.lmbda.cpu().numpy(),
                scored.searched.cpu().numpy(),
            )
            for row in np.unique(sequence):
                mask = sequence == row
                rows[row].append(tuple(c[mask] for c in columns))
        for job, parts in zip(batch, rows, strict=True):
            _settle(job.future, result=parts if explain else _token_scores(parts))

    def _complete(self, batch: list[_Job]) -> None:
        """One ``decode`` for every prompt; a request is answered as soon as its row ends."""
        from knn_store.generation import decode

        stop = set(self.session.lm.stop_ids)
        got: list[list[int]] = [[] for _ in batch]

        def on_token(row: int, step: Step) -> bool:
            job = batch[row]
            got[row].append(step.token)
            go_on = True
            if job.on_step is not None:
                try:
                    go_on = job.on_step(step) is not False
                except Exception:  # a gone client must not stop the other rows
                    log.warning("a streaming callback failed; its request stops streaming")
                    job.on_step = None
            ended = step.token in stop or len(got[row]) >= job.args.max_new_tokens
            if ended or not go_on:
                _settle(job.future, result=list(got[row]))
            return go_on

        def on_error(row: int, error: Exception) -> None:
            log.warning("sampling failed for one request of a batch: %s", error)
            _settle(batch[row].future, error=error)

        out = decode(
            self.session.knn_lm,
            [job.ids for job in batch],
            [job.args for job in batch],
            on_token=on_token,
            on_error=on_error,
            top_logprobs=max(job.top_logprobs for job in batch),
        )
        self.stats.lm_forwards += max(len(tokens) for tokens in out)  # one step per token
        for job, tokens in zip(batch, out, strict=True):
            _settle(job.future, result=tokens)


def _token_scores(parts: list[tuple[np.ndarray, ...]]) -> TokenScores:
    """Join one text's rows from several forwards, in position order."""
    columns = (np.concatenate(c) for c in zip(*parts, strict=True))
    position, targets, base, knn, lambdas, searched = columns
    order = np.argsort(position, kind="stable")
    return TokenScores(
        targets=targets[order],
        base_log_probs=base[order],
        knn_log_probs=knn[order],
        lambdas=lambdas[order],
        searched=searched[order],
    )


def _settle(future: Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a job once; later answers (and cancelled jobs) are ignored."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled meanwhile, before it was taken into a batch
        pass
