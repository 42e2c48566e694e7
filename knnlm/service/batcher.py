"""The model's one worker thread, and how it batches the requests waiting for it.

One module because batching, isolation, cancellation and deadlines all act on the same queue
and the same worker, under one lock.

HTTP handlers never touch the LM: they submit jobs and wait on futures. The worker owns the
session's LM and store. Each round it takes the oldest waiting job and every other waiting
job that can share its work, up to ``max_batch`` windows (scoring) or rows (generation):

- score jobs with the same kNN options, and explain jobs with the same display options,
  become one ``KnnLM.score`` call over all their texts, so their windows share LM forwards
  and batched searches; the rows come back apart by ``LMView.sequence``;
- completion jobs become one ``decode`` call: one forward and one search per step for every
  row, each row sampling with its own seed, streaming its tokens to its own request.

Rows of a batch do not see each other (right-padded windows, left-padded prompts), so a
request gets the answer it would get alone up to float rounding: a forward over more rows
runs other matrix kernels, whose sums round differently. ``batch_invariant=True`` runs every
job in forwards of its own, shaped as alone, for answers equal to the bit (and no sharing).
When the oldest job arrived less than ``max_wait`` ago and the batch is not full, the worker
waits that long for company.

A request is isolated from the rest of its batch: a row whose sampling fails ends alone, and
when a score or explain call fails for a batch, each of its jobs runs again alone, so only
the guilty one gets the error. A job can be cancelled (its client left) or pass its
deadline: waiting, it never runs; decoding, its row ends at the next step; scored, its
result is dropped.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from knn_store.errors import (
    ConfigError,
    CorpusError,
    DeadlineExceeded,
    KnnlmError,
    QueueFull,
    RequestCancelled,
    ServiceUnavailable,
    ShuttingDown,
)
from knn_store.results import TokenScores

if TYPE_CHECKING:
    import torch

    from knn_store.generation import Sampling, Step
    from knn_store.knn_lm import KnnLM
    from knn_store.results import TokenExplanation
    from knn_store.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnOptions:
    """Per-request retrieval settings, meaning what the same ``knnlm eval`` flags mean;
    None keeps the server's."""

    lmbda: float | None = None
    temperature: float | None = None
    top_k: int | None = None


@dataclass
class BatchStats:
    """What the worker has done: ``batches`` below ``requests`` means requests shared work."""

    requests: int = 0  # jobs run (not counting refused or cancelled ones)
    batches: int = 0  # rounds of the worker, each one score, explain or decode call
    lm_forwards: int = 0  # LM forward passes (windows batches, or decoding steps)
    largest_batch: int = 0  # most jobs in one round
    cancelled: int = 0  # jobs cancelled, or ended by their deadline or the shutdown's
    # for GET /metrics (service.metrics reads them when scraped); by job kind
    busy_seconds: float = 0.0  # the worker's time inside batches
    shapes: Counter[tuple[str, int, int]] = field(default_factory=Counter)  # (kind, jobs, rows)
    tokens: Counter[str] = field(default_factory=Counter)  # positions scored, tokens generated
    searched: Counter[str] = field(default_factory=Counter)  # positions searched
    skipped: Counter[str] = field(default_factory=Counter)  # positions the gate did not search
    followed: Counter[str] = field(default_factory=Counter)  # served by pointers, no search
    # The worker, request threads (cancelling) and the shutdown timer all count: every
    # change, and a reader's copy (/metrics), holds this lock.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        """Add to the plain counters named (``add(cancelled=1)``)."""
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def tally(self, counter: str, key: Hashable, amount: int = 1) -> None:
        """Add to one key of a per-kind counter (``tally("tokens", "score", 12)``)."""
        with self.lock:
            getattr(self, counter)[key] += amount

    def count_searches(
        self, kind: str, searched: torch.Tensor, followed: torch.Tensor | None = None
    ) -> None:
        """Tally one call's positions: bool tensors [m], True where searched, and where
        scored from followed pointers instead (None: pointer following off); the rest the
        gate skipped."""
        n = int(searched.sum())
        f = 0 if followed is None else int(followed.sum())
        with self.lock:
            self.searched[kind] += n
            self.followed[kind] += f
            self.skipped[kind] += len(searched) - n - f

    def to_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "lm_forwards": self.lm_forwards,
            "largest_batch": self.largest_batch,
        }


# Clients that honour Retry-After ignore longer waits (OpenAI's Python client takes at most
# 60 s and retries at once past it): past this, the estimate says this much.
RETRY_AFTER_CAP = 60


def _work(job: _Job) -> int:
    """A job's work, in the unit its kind is timed in: windows to score or explain, tokens to
    generate at most."""
    return job.args.max_new_tokens if job.kind == "complete" else job.size


@dataclass(eq=False)
class _Job:
    kind: str  # "score", "explain" or "complete"
    group: Hashable  # jobs of one group can run in one call
    size: int  # windows (score, explain) or rows (complete) it adds to a batch
    ids: np.ndarray  # int64 token ids, BOS first
    args: Any  # the KnnLM to score with, (top, neighbours), or Sampling
    on_step: Callable[[Step], bool | None] | None = None
    top_logprobs: int = 0
    future: Future[Any] = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)
    deadline: float = math.inf  # time.monotonic() past which it is dropped


class Batcher:
    """Runs score, explain and completion jobs on one thread, batching what waits together.

    Args:
        session: the open session; from ``start()`` on, only the worker uses its LM.
        max_batch: windows (scoring) or rows (generation) per batch at most.
        max_wait: seconds the oldest job may wait for others to join an unfilled batch.
        max_pending: jobs allowed to wait; past it, submissions get ``QueueFull``.
        request_timeout: seconds a job may take from its submission (None: no deadline);
            past it, it gets ``DeadlineExceeded`` and leaves its batch.
        batch_invariant: run every job in forwards of its own, shaped exactly as alone, so
            its numbers are the same to the bit whatever else waits (batching is off).
    """

    def __init__(
        self,
        session: Session,
        *,
        max_batch: int = 8,
        max_wait: float = 0.005,
        max_pending: int = 1024,
        request_timeout: float | None = None,
        batch_invariant: bool = False,
    ) -> None:
        if max_batch < 1 or max_pending < 1 or not 0 <= max_wait < math.inf:
            raise ValueError("max_batch and max_pending must be positive, max_wait >= 0")
        if request_timeout is not None and not 0 < request_timeout < math.inf:
            raise ValueError("request_timeout must be positive and finite, or None")
        self.session = session
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_pending = max_pending
        self.request_timeout = request_timeout
        self.batch_invariant = batch_invariant
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet taken into a batch
        self._live: dict[int, _Job] = {}  # id(future) -> job, until its future is done
        self._closed = False
        self._drain_deadline = math.inf  # after it, the shutdown refuses what is left
        # For Retry-After: the work waiting (``_work``: windows to score, tokens to generate),
        # by kind, and the seconds a unit of it has taken lately (a running average)
        self._queued_work: Counter[str] = Counter()
        self._unit_seconds: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="knnlm-model", daemon=True)

    # --- the handlers' side ----------------------------------------------------------------

    def score(self, ids: np.ndarray, options: KnnOptions = KnnOptions()) -> Future[TokenScores]:
        """Score every predicted token of ``ids`` (``session.encode``), as eval would."""
        # resolved once, here: bad options fail before the job joins anyone's batch, and the
        # job carries the kNN-LM it runs with (jobs of equal options share a batch)
        knn_lm = self.knn_lm_for(options)
        return self._submit("score", ("score", options), self._windows(ids), ids, knn_lm)

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

    def cancel(self, future: Future[Any], reason: KnnlmError | None = None) -> bool:
        """Stop the job behind ``future``, answering it with ``reason`` (``RequestCancelled``
        by default): a waiting job never runs, a decoding row ends at the next step, and a
        job being scored has its result dropped. False if it was done already (or unknown)."""
        with self._lock:
            job = self._live.get(id(future))
        if job is None or job.future is not future or future.done():
            return False
        self.stats.add(cancelled=1)
        _settle(future, error=reason or RequestCancelled("the request was cancelled"))
        return True

    def time_left(self, future: Future[Any]) -> float | None:
        """Seconds until the deadline of the job behind ``future``; None without one."""
        with self._lock:
            job = self._live.get(id(future))
        if job is None or job.deadline == math.inf:
            return None
        return max(0.0, job.deadline - time.monotonic())

    def knn_lm_for(self, options: KnnOptions) -> KnnLM:
        """The session's kNN-LM with a request's ``options`` (``Session.with_overrides``)."""
        return self.session.with_overrides(
            lmbda=options.lmbda, temperature=options.temperature, top_k=options.top_k
        )

    def _windows(self, ids: np.ndarray) -> int:
        knn_lm = self.session.knn_lm
        n = sum(len(batch) for batch in knn_lm.window_batches([ids]))
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
        if self.request_timeout is not None:
            job.deadline = job.queued + self.request_timeout
        with self._lock:
            if self._closed or self._drain_deadline < math.inf:  # a shutdown has begun:
                raise _shutting_down()  # what is in hand finishes, nothing new is taken
            if self._waiting >= self.max_pending:
                retry_after = self._drain_seconds()
                raise QueueFull(
                    f"{self._waiting} requests are already waiting, the most this server "
                    f"queues (--max-queue); retry in {retry_after} s",
                    retry_after=retry_after,
                )
            if not self._thread.is_alive():
                if self._thread.ident is not None:
                    raise ServiceUnavailable("the model worker stopped; restart the server")
                self._thread.start()
            self._waiting += 1
            self._queued_work[job.kind] += _work(job)
            self._live[id(job.future)] = job
            self._queue.put(job)
        job.future.add_done_callback(self._forget)
        return job.future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._live.pop(id(future), None)

    def start(self) -> None:
        """Start the worker now (submitting a job also does)."""
        with self._lock:
            if self._thread.ident is None and not self._closed:
                self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet taken into a batch (the queue's depth)."""
        return self._waiting

    @property
    def healthy(self) -> bool:
        """Open, and the worker (once started) is running."""
        return not self._closed and (self._thread.ident is None or self._thread.is_alive())

    @property
    def drain_deadline(self) -> float:
        """When (``time.monotonic``) a shutdown refuses what is left; inf before one."""
        return self._drain_deadline

    def drain(self, seconds: float) -> None:
        """A shutdown with a deadline: new jobs are refused at once (``ShuttingDown``); those
        submitted before go on being taken and run for ``seconds``; then every job still
        waiting or running is answered ``ShuttingDown`` (a decoding row ends at its next
        step). ``close()`` stops the worker."""
        with self._lock:
            self._drain_deadline = min(self._drain_deadline, time.monotonic() + seconds)
        timer = threading.Timer(max(seconds, 0.0), self._refuse_live)
        timer.daemon = True
        timer.start()

    def _refuse_live(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for job in live:
            if not job.future.done():
                self.stats.add(cancelled=1)
                _settle(job.future, error=_shutting_down())

    def close(self, timeout: float | None = None) -> None:
        """Finish the batch in hand, refuse what still waits, and stop the worker; wait
        ``timeout`` seconds for it at most (after ``drain()``, by default, until a second
        past its deadline: a forward in hand cannot be interrupted, and the worker thread
        is a daemon)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._thread.ident is not None
            if timeout is None and self._drain_deadline < math.inf:
                timeout = max(self._drain_deadline + 1.0 - time.monotonic(), 0.0)
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
                started = time.perf_counter()
                self._run_batch(batch)
                self.stats.add(busy_seconds=time.perf_counter() - started)
        for job in pending:
            _settle(job.future, error=_shutting_down())
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _settle(job.future, error=_shutting_down())

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
        """The oldest job and the later ones of its group that fit, in arrival order (only
        the oldest when batch-invariant); jobs cancelled or past their deadline are dropped."""
        batch: list[_Job] = []
        size = 0
        rest: deque[_Job] = deque()
        now = time.monotonic()
        while pending:
            job = pending.popleft()
            fits = not batch or (
                not self.batch_invariant
                and job.group == batch[0].group
                and size + job.size <= self.max_batch
            )
            if not fits:
                rest.append(job)
                continue
            with self._lock:
                self._waiting -= 1
                self._queued_work[job.kind] -= _work(job)
            if now >= job.deadline:
                self.stats.add(cancelled=1)
                _settle(job.future, error=self.deadline_error())
            if now >= self._drain_deadline:
                _settle(job.future, error=_shutting_down())
            if _start(job.future):  # False: cancelled or answered while it waited
                batch.append(job)
                size += job.size
        pending.extend(rest)
        return batch

    def deadline_error(self) -> DeadlineExceeded:
        """The error of a job past ``request_timeout``."""
        return DeadlineExceeded(
            f"the request took longer than this server's deadline of {self.request_timeout:g} s "
            "(--request-timeout); retry when it is less busy, or ask for less"
        )

    def _run_batch(self, batch: list[_Job], *, retry: bool = True) -> None:
        kind = batch[0].kind
        # a rerun is not a new request
        self.stats.add(batches=1, requests=len(batch) if retry else 0)
        with self.stats.lock:
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.tally("shapes", (kind, len(batch), sum(job.size for job in batch)))
        started = time.monotonic()
        try:
            if kind == "complete":
                self._complete(batch)
            else:
                self._score(batch, explain=kind == "explain")
        except Exception as exc:
            if retry and kind != "complete" and len(batch) > 1:
                # one bad job must not fail the others: each runs again alone (decoding
                # isolates its rows itself, and its rows may have streamed tokens already)
                log.warning(
                    "a batch of %d %s requests failed (%s); running each alone",
                    len(batch),
                    kind,
                    type(exc).__name__,
                )
                for job in batch:
                    if not job.future.done():
                        self._run_batch([job], retry=False)
                return
            if not isinstance(exc, KnnlmError):
                log.exception("a batch of %d %s requests failed", len(batch), kind)
            for job in batch:
                _settle(job.future, error=exc)
        unit = (time.monotonic() - started) / max(1, sum(_work(job) for job in batch))
        with self._lock:
            last = self._unit_seconds.get(kind, unit)
            self._unit_seconds[kind] = 0.8 * last + 0.2 * unit

    def _drain_seconds(self) -> int:
        """How long the work waiting now should take, at the pace of recent batches of each
        kind (a kind not run yet: the slowest pace seen, else a second a unit), in whole
        seconds from 1 to ``RETRY_AFTER_CAP``. Call with the lock held."""
        pace = max(self._unit_seconds.values(), default=1.0)
        seconds = sum(
            units * self._unit_seconds.get(kind, pace) for kind, units in self._queued_work.items()
        )
        return min(max(math.ceil(seconds), 1), RETRY_AFTER_CAP)

    def _score(self, batch: list[_Job], *, explain: bool) -> None:
        """One ``KnnLM.score`` over every text of the batch, split back per text."""
        from knn_store.explain import explain_scored

        windows = sum(job.size for job in batch)
        if explain:  # full distributions: keep the CLI's windows per forward, for memory
            knn_lm = self.session.knn_lm
            per_forward = min(windows, self.session.settings.batch_size)
        else:
            knn_lm = batch[0].args  # resolved at submit (``score``)
            per_forward = min(windows, self.max_batch)
        runner = knn_lm.with_options(batch_size=per_forward)
        rows: list[list[Any]] = [[] for _ in batch]
        for scored in runner.score([job.ids for job in batch], full=explain):
            self.stats.add(lm_forwards=scored.lm.forwards)
            self.stats.tally("tokens", batch[0].kind, len(scored))
            self.stats.count_searches(batch[0].kind, scored.searched, scored.followed)
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

        got: list[list[int]] = [[] for _ in batch]
        steps = 0

        def on_token(row: int, step: Step) -> bool:
            nonlocal steps
            job = batch[row]
            got[row].append(step.token)
            # counted here, not after decode: the row's answer may go out with this token
            self.stats.tally("tokens", "complete")
            if step.searched is not None:  # a kNN-LM step: searched, followed or skipped
                counter = (
                    "searched" if step.searched else ("followed" if step.followed else "skipped")
                )
                self.stats.tally(counter, "complete")
            if len(got[row]) > steps:  # the first row to report a step: one more forward
                steps = len(got[row])
                self.stats.add(lm_forwards=1)
            now = time.monotonic()
            if now >= job.deadline and not job.future.done():
                self.stats.add(cancelled=1)
                _settle(job.future, error=self.deadline_error())
            if now >= self._drain_deadline:
                _settle(job.future, error=_shutting_down())
            if job.future.done():  # cancelled, past its deadline, or the shutdown's
                return False
            go_on = True
            if job.on_step is not None:
                try:
                    go_on = job.on_step(step) is not False
                except Exception:  # a gone client must not stop the other rows
                    log.warning("a streaming callback failed; its request stops streaming")
                    job.on_step = None
            if step.last or not go_on:
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


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the server is shutting down; retry on another replica or later")


def _start(future: Future[Any]) -> bool:
    """Mark a taken job running; False when it was cancelled or answered while it waited."""
    if future.done():
        return False
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # answered (cancel(), the shutdown) between the check and now
        return False


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
