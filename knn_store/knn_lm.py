"""``KnnLM``: a language model, a datastore and a lambda policy, composed. The one scoring
pipeline: eval, tune, explain, generation and the HTTP service all go through it.

Per batch of windows: one LM forward gives the log-probabilities and the keys; the retrieval
gate (if tuned) picks the positions worth a search; one batched search covers them; the
policy sets lambda from what retrieval found; the two distributions mix in log space. While
the search of one batch runs, the LM computes the next.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from knn_store.doc_cache import CacheState, DocumentCache
from knn_store.errors import ConfigError, CorpusError
from knn_store.gate import RetrievalGate
from knn_store.knn import interpolate, knn_log_probs, knn_target_log_probs
from knn_store.lambdas import LambdaPolicy, QueryFeatures
from knn_store.lm import LanguageModel
from knn_store.pointers import (
    UNKNOWN,
    Pointers,
    PointerState,
    follow,
    pointer_neighbours,
    union_neighbours,
)
from knn_store.progress import Progress, no_progress
from knn_store.store.base import KnnStore, Neighbours, PointFilter
from knn_store.store.config import SearchOptions
from knn_store.windows import Window, sliding_windows


@dataclass(frozen=True)
class LMView:
    """The LM's view of m scored positions (one forward over a batch of windows)."""

    sequence: np.ndarray  # int64 [m], index of each position's input sequence
    position: np.ndarray  # int64 [m], absolute position; it predicts token position + 1
    keys: torch.Tensor  # float32 [m, dim]
    targets: torch.Tensor  # int64 [m], the true next tokens
    lm_target_log_prob: torch.Tensor  # float32 [m]
    lm_entropy: torch.Tensor  # float32 [m]
    lm_max_log_prob: torch.Tensor  # float32 [m]
    # float32 [m, V], when the full distribution (or top-1 accuracy) is wanted
    lm_log_probs: torch.Tensor | None
    lm_seconds: float
    forwards: int  # LM forward passes it took (one per padded width)


@dataclass(frozen=True)
class Scored:
    """m scored positions under the LM and the kNN-LM."""

    lm: LMView
    neighbours: Neighbours  # [m, k]; empty rows where the gate skipped the search
    features: QueryFeatures  # what the lambda policy saw
    searched: torch.Tensor  # bool [m]
    lmbda: torch.Tensor  # float32 [m]
    knn_log_prob: torch.Tensor  # float32 [m], log p_kNN(target); -inf where none
    log_prob: torch.Tensor  # float32 [m], the kNN-LM's log p(target)
    knn_log_probs: torch.Tensor | None  # float32 [m, V], with full distributions
    log_probs: torch.Tensor | None  # float32 [m, V], the kNN-LM's, with full distributions
    search_seconds: float
    # bool [m], positions scored from followed pointers instead of a search (pointer
    # following on); None when it is off
    followed: torch.Tensor | None = None
    # bool [m] each, whether the argmax of the LM's and of the kNN-LM's distribution is the
    # token that came (top-1 accuracy); None unless asked for (``score(top1=True)``)
    lm_correct: torch.Tensor | None = None
    correct: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.lm.targets)


@dataclass(frozen=True)
class EvalResult:
    tokens: int
    base_nll: float  # summed over tokens, nats
    knn_nll: float
    lm_seconds: float
    search_seconds: float
    queries: int  # positions actually searched (the gate may skip some)
    zero_prob_tokens: int  # tokens the kNN-LM gave probability 0 (lambda 1, no neighbour)
    followed: int | None = None  # positions scored from followed pointers (None: off)
    base_correct: int = 0  # positions where the LM's argmax is the token that came
    knn_correct: int = 0  # ... and the kNN-LM's argmax

    @property
    def base_perplexity(self) -> float:
        return perplexity(self.base_nll, self.tokens)

    @property
    def base_top1(self) -> float:
        """Top-1 next-token accuracy of the LM alone."""
        return self.base_correct / self.tokens if self.tokens else 0.0

    @property
    def knn_top1(self) -> float:
        """Top-1 next-token accuracy of the kNN-LM (its whole mixed distribution)."""
        return self.knn_correct / self.tokens if self.tokens else 0.0

    @property
    def knn_perplexity(self) -> float:
        return perplexity(self.knn_nll, self.tokens)

    @property
    def search_ms_per_query(self) -> float:
        return 1000 * self.search_seconds / self.queries if self.queries else 0.0

    @property
    def skipped_share(self) -> float:
        return 1 - self.queries / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "base_perplexity": self.base_perplexity,
            "knn_perplexity": self.knn_perplexity,
            "change_percent": 100 * (self.knn_perplexity / self.base_perplexity - 1),
            "base_top1": self.base_top1,
            "knn_top1": self.knn_top1,
            "lm_seconds": self.lm_seconds,
            "search_seconds": self.search_seconds,
            "searches": self.queries,
            "skipped_share": self.skipped_share,
            "search_ms_per_query": self.search_ms_per_query,
            "zero_probability_tokens": self.zero_prob_tokens,
            **({} if self.followed is None else {"followed_pointers": self.followed}),
        }


class KnnLM:
    """Retrieval plus interpolation on top of an LM. Build it with ``open_session``.

    Args:
        lm: the language model whose keys the store holds.
        store: the datastore to search.
        k: neighbours per query.
        temperature: softmax temperature T over -d^2.
        policy: lambda per position from what retrieval found.
        gate: skips the search where the LM alone will do; None searches everywhere.
        search: HNSW/exact, ef, rescoring.
        domains: restrict retrieval to these domain tags (empty: all).
        window, stride: sliding windows over long texts (``knn_store.windows``).
        batch_size: windows per LM forward.
        search_batch: queries per search request.
        pointer_min: follow pointers (``knn_store.pointers``) and skip the search where at
            least this many successors remain; 0 (the default) searches every position.
            Needs a collection made with ``knnlm rebuild --successors``.
        cache: a document cache of each text's earlier keys (``knn_store.doc_cache``) mixed
            into the result; None (the default) for none.
    """

    def __init__(
        self,
        lm: LanguageModel,
        store: KnnStore,
        *,
        k: int,
        temperature: float,
        policy: LambdaPolicy,
        gate: RetrievalGate | None = None,
        search: SearchOptions | None = None,
        domains: Sequence[str] = (),
        window: int,
        stride: int,
        batch_size: int = 1,
        search_batch: int = 256,
        pointer_min: int = 0,
        cache: DocumentCache | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"`k` must be positive, got {k}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"`temperature` must be finite and positive, got {temperature}")
        if search_batch < 1 or batch_size < 1:
            raise ValueError("`batch_size` and `search_batch` must be positive")
        if pointer_min < 0:
            raise ValueError(f"`pointer_min` must be 0 (off) or positive, got {pointer_min}")
        if pointer_min and store.meta is not None and not store.meta.successors:
            raise ConfigError(
                f"collection {store.name!r} has no successor links for pointer following; "
                "copy it with `knnlm rebuild --to-collection NEW --successors` and use that"
            )
        self.lm = lm
        self.store = store
        self.k = k
        self.temperature = temperature
        self.policy = policy
        self.gate = gate
        self.search = search or SearchOptions()
        self.filter = PointFilter(domains=tuple(domains))
        self.window = window
        self.stride = stride
        self.batch_size = batch_size
        self.search_batch = search_batch
        self.pointer_min = pointer_min
        self.cache = cache

    def with_options(self, **changes: Any) -> KnnLM:
        """A copy with some arguments replaced (per-request lambda, T or k in the service)."""
        args = {
            "k": self.k,
            "temperature": self.temperature,
            "policy": self.policy,
            "gate": self.gate,
            "search": self.search,
            "domains": self.filter.domains,
            "window": self.window,
            "stride": self.stride,
            "batch_size": self.batch_size,
            "search_batch": self.search_batch,
            "pointer_min": self.pointer_min,
            "cache": self.cache,
        }
        unknown = set(changes) - set(args)
        if unknown:
            raise TypeError(f"unknown KnnLM arguments: {sorted(unknown)}")
        return KnnLM(self.lm, self.store, **{**args, **changes})

    # --- the steps -------------------------------------------------------------------------

    def search_mask(self, lm_entropy: torch.Tensor, lm_max_log_prob: torch.Tensor) -> torch.Tensor:
        """bool [n]: the positions to search (all, without a gate)."""
        if self.gate is None:
            return torch.ones(len(lm_entropy), dtype=torch.bool, device=lm_entropy.device)
        return self.gate(lm_entropy, lm_max_log_prob)

    def neighbours(
        self,
        keys: torch.Tensor,
        *,
        searched: torch.Tensor | None = None,
        with_cosine: bool | None = None,
    ) -> Neighbours:
        """Top-k neighbours of float [n, dim] keys, in batches; rows where ``searched``
        (bool [n]) is False are left empty.

        ``with_cosine`` (default: when the policy needs it) also reads each query's nearest
        key back from the store and fills ``Neighbours.cosine``.
        """
        if with_cosine is None:
            with_cosine = self.policy.needs_cosine
        queries = keys.detach().float().cpu().numpy()  # [n, dim]
        rows = np.arange(len(queries)) if searched is None else searched.cpu().numpy().nonzero()[0]
        parts: list[Neighbours] = []
        for lo in range(0, len(rows), self.search_batch):
            chunk = queries[rows[lo : lo + self.search_batch]]  # [b, dim]
            part = self.store.search(chunk, k=self.k, options=self.search, filter=self.filter)
            if with_cosine:
                part = replace(part, cosine=self._nearest_cosine(chunk, part))
            parts.append(part)
        found = Neighbours.concat(parts, k=self.k)
        if len(rows) == len(queries):
            return found
        return found.scatter(rows, len(queries))

    def _nearest_cosine(self, queries: np.ndarray, neighbours: Neighbours) -> np.ndarray:
        """float32 [b]: cosine of each query and its nearest stored key (0 without one)."""
        assert neighbours.point_ids is not None
        nearest = neighbours.point_ids[:, 0]  # [b]
        found = self.store.retrieve(
            [i for i in nearest if i is not None], with_keys=True, with_payload=False
        )
        keys = np.zeros_like(queries)  # [b, dim]; a zero key gives cosine 0
        for row, pid in enumerate(nearest):  # one lookup per query, not per neighbour
            if pid is not None and str(pid) in found:
                keys[row] = found[str(pid)].key
        dot = (queries * keys).sum(-1)
        norms = np.linalg.norm(queries, axis=-1) * np.linalg.norm(keys, axis=-1)
        return (dot / np.maximum(norms, 1e-12)).astype(np.float32)

    def features(
        self, neighbours: Neighbours, *, lm_entropy: torch.Tensor, lm_max_log_prob: torch.Tensor
    ) -> QueryFeatures:
        """What the lambda policy sees, from neighbours and two summaries of p_LM (float [n])."""
        device = lm_entropy.device
        cosine = None if neighbours.cosine is None else torch.from_numpy(neighbours.cosine)
        return QueryFeatures(
            sq_distances=torch.from_numpy(neighbours.sq_distances).to(device),
            token_ids=torch.from_numpy(neighbours.token_ids).to(device),
            lm_entropy=lm_entropy,
            lm_max_log_prob=lm_max_log_prob,
            cosine=None if cosine is None else cosine.to(device),
        )

    def next_token_log_probs(
        self, lm_log_probs: torch.Tensor, keys: torch.Tensor, *, use_gate: bool = True
    ) -> torch.Tensor:
        """The kNN-LM's log p over the vocabulary, float [b, V], from the LM's log p [b, V]
        and the keys [b, dim] of the same positions (generation's step). A position the gate
        skips keeps the LM's distribution exactly."""
        entropy, max_log_prob = lm_summary(lm_log_probs)
        searched = self.search_mask(entropy, max_log_prob) if use_gate else None
        if searched is not None and not searched.any():
            return lm_log_probs
        neighbours = self.neighbours(keys, searched=searched)
        features = self.features(neighbours, lm_entropy=entropy, lm_max_log_prob=max_log_prob)
        knn = knn_log_probs(
            features.sq_distances,
            features.token_ids,
            vocab_size=lm_log_probs.shape[-1],
            temperature=self.temperature,
        )  # [b, V]
        mixed = interpolate(lm_log_probs, knn, self.policy(features))
        if searched is None:
            return mixed
        return torch.where(searched[:, None], mixed, lm_log_probs)

    # --- the pipeline ----------------------------------------------------------------------

    def lm_view(self, group: list[tuple[int, np.ndarray, Window]], *, full: bool = False) -> LMView:
        """The LM over a batch of windows (sequence index, tokens, window), reduced to what
        scoring needs at each scored position; with ``full``, its log-probs [m, V] too."""
        started = time.perf_counter()
        outs, forwards = self.lm.forward_windows(
            [(seq, w) for _, seq, w in group], cap=self.window, with_logits=True
        )
        keys = torch.cat([o.keys for o in outs])  # [m, dim]
        t = torch.from_numpy(np.concatenate([seq[w.positions + 1] for _, seq, w in group]))
        t = t.to(keys.device)  # [m], the true next tokens
        logits = torch.cat([o.logits for o in outs if o.logits is not None])  # [m, V]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        entropy, max_log_prob = lm_summary(log_probs)
        return LMView(
            sequence=np.concatenate([np.full(len(w.positions), i) for i, _, w in group]),
            position=np.concatenate([w.positions for _, _, w in group]),
            keys=keys,
            targets=t,
            lm_target_log_prob=log_probs.gather(1, t[:, None]).squeeze(1),
            lm_entropy=entropy,
            lm_max_log_prob=max_log_prob,
            lm_log_probs=log_probs if full else None,
            lm_seconds=time.perf_counter() - started,
            forwards=forwards,
        )

    def finish(
        self,
        view: LMView,
        *,
        full: bool = False,
        use_gate: bool = True,
        with_cosine: bool | None = None,
        pointers: PointerState | None = None,
        cache_state: CacheState | None = None,
        top1: bool = False,
    ) -> Scored:
        """Search, weigh and mix for the positions of one ``LMView``.

        ``pointers`` and ``cache_state`` carry pointer following and the document cache
        from one batch of a text to the next (``score`` makes them); without them those
        levers stay off. ``top1`` (the view must hold the LM's log-probs) also says whether
        the argmax of each distribution is the token that came; the kNN-LM's whole mixed
        distribution is built for it, then dropped unless ``full``.
        """
        started = time.perf_counter()
        searched = (
            self.search_mask(view.lm_entropy, view.lm_max_log_prob)
            if use_gate
            else torch.ones(len(view.targets), dtype=torch.bool, device=view.keys.device)
        )
        followed = None
        if self.pointer_min and pointers is not None:
            neighbours, searched, followed = self._search_or_follow(
                view, searched, pointers, with_cosine=with_cosine
            )
        else:
            neighbours = self.neighbours(view.keys, searched=searched, with_cosine=with_cosine)
        search_seconds = time.perf_counter() - started
        features = self.features(
            neighbours, lm_entropy=view.lm_entropy, lm_max_log_prob=view.lm_max_log_prob
        )
        lmbda = self.policy(features)  # [m]; 0 where nothing was found or searched
        knn_lp = knn_target_log_probs(
            features.sq_distances, features.token_ids, view.targets, temperature=self.temperature
        )
        knn_full = mixed_full = None
        if full or top1:
            assert view.lm_log_probs is not None, "the view needs the LM's log-probs (full)"
            knn_full = knn_log_probs(
                features.sq_distances,
                features.token_ids,
                vocab_size=view.lm_log_probs.shape[-1],
                temperature=self.temperature,
            )
            mixed_full = interpolate(view.lm_log_probs, knn_full, lmbda)
        log_prob = interpolate(view.lm_target_log_prob, knn_lp, lmbda)
        if self.cache is not None and cache_state is not None:
            cached = self.cache.target_log_probs(
                cache_state,
                sequence=view.sequence,
                position=view.position,
                keys=view.keys,
                targets=view.targets,
                vocab_size=self.lm.vocab_size if mixed_full is None else mixed_full.shape[-1],
                full=mixed_full is not None,
            )
            log_prob = self.cache.mix(log_prob, cached.target_log_prob, cached.has_memory)
            if mixed_full is not None and cached.log_probs is not None:
                mixed_full = self.cache.mix(mixed_full, cached.log_probs, cached.has_memory)
        lm_correct = correct = None
        if top1:
            assert view.lm_log_probs is not None and mixed_full is not None
            lm_correct = view.lm_log_probs.argmax(-1) == view.targets  # [m]
            correct = mixed_full.argmax(-1) == view.targets  # [m]
        if top1 and not full:  # the [m, V] tensors served top-1 only: do not keep them
            view = replace(view, lm_log_probs=None)
            knn_full = mixed_full = None
        return Scored(
            lm=view,
            neighbours=neighbours,
            features=features,
            searched=searched,
            lmbda=lmbda,
            knn_log_prob=knn_lp,
            log_prob=log_prob,
            knn_log_probs=knn_full,
            log_probs=mixed_full,
            search_seconds=search_seconds,
            followed=followed,
            lm_correct=lm_correct,
            correct=correct,
        )

    def _search_or_follow(
        self,
        view: LMView,
        allowed: torch.Tensor,
        state: PointerState,
        *,
        with_cosine: bool | None,
    ) -> tuple[Neighbours, torch.Tensor, torch.Tensor]:
        """Neighbours of a view's positions with pointer following: each position takes
        the pointers its text's previous position left, if at least ``pointer_min``, and is
        searched otherwise, scoring the search's neighbours united with the pointers it had
        (``pointers.union_neighbours``, as RetoMaton does). Positions where ``allowed``
        (bool [m], the gate) is False get neither, and their text's pointers are dropped.

        A text's positions depend on each other, so they go one step at a time; each step
        takes the next position of every text in the view at once (one search, one or two
        lookups). Returns the neighbours [m, w] and the bool [m] masks searched, followed;
        w >= k is the widest row (a union, or all the pointers followed), the rest padded.
        """
        m = len(view.targets)
        queries = view.keys.detach().float().cpu().numpy()  # [m, dim]
        targets = view.targets.cpu().numpy()  # [m]
        ok = allowed.cpu().numpy()  # [m]
        out = Neighbours.empty(m, self.k)
        nexts = np.full((m, self.k), UNKNOWN, dtype=np.int64)  # [m, k], see pointers.follow
        searched = np.zeros(m, dtype=bool)
        followed = np.zeros(m, dtype=bool)
        # each text's rows in position order; ``step`` is a row's rank within its text
        order = np.lexsort((view.position, view.sequence))  # [m]
        text = view.sequence[order]
        starts = np.flatnonzero(np.r_[True, text[1:] != text[:-1]])  # first row of each text
        step = np.arange(m) - np.repeat(starts, np.diff(np.r_[starts, m]))  # [m]
        for s in range(int(step.max()) + 1 if m else 0):
            rows = order[step == s]  # [L], one per text
            ready = [
                state.ready(int(view.sequence[r]), int(view.position[r])) or _NO_POINTERS
                for r in rows
            ]
            enough = np.array([len(p) >= self.pointer_min for p in ready])
            use = enough & ok[rows]  # [L]
            if use.any():
                mine = [p for p, u in zip(ready, use, strict=True) if u]
                found, found_next = pointer_neighbours(
                    queries[rows[use]], mine, k=max(self.k, *(len(p) for p in mine))
                )
                out, nexts = _place(out, nexts, found, found_next, rows[use])
                followed[rows[use]] = True
            look = ~use & ok[rows]  # [L]
            if look.any():
                found = self.store.search(
                    queries[rows[look]], k=self.k, options=self.search, filter=self.filter
                )
                mine = [p for p, u in zip(ready, look, strict=True) if u]
                most = max(len(p) for p in mine)
                found_next = np.full(found.token_ids.shape, UNKNOWN, dtype=np.int64)
                if most:  # fewer than pointer_min pointers, but some: score the union
                    before = int((found.token_ids >= 0).sum())
                    found, found_next = union_neighbours(
                        queries[rows[look]], found, mine, width=self.k + most
                    )
                    state.united += sum(1 for p in mine if len(p))
                    state.added += int((found.token_ids >= 0).sum()) - before
                out, nexts = _place(out, nexts, found, found_next, rows[look])
                searched[rows[look]] = True
            active = rows[ok[rows]]
            assert out.point_ids is not None
            successors = follow(
                self.store,
                positions=view.position[active],
                point_ids=out.point_ids[active],
                token_ids=out.token_ids[active],
                nexts=nexts[active],
                targets=targets[active],
                state=state,
            )
            for r, pointers in zip(active, successors, strict=True):
                state.by_sequence[int(view.sequence[r])] = pointers
            for r in rows[~ok[rows]]:
                state.by_sequence.pop(int(view.sequence[r]), None)
        state.followed += int(followed.sum())
        state.searched += int(searched.sum())
        if self.policy.needs_cosine if with_cosine is None else with_cosine:
            out = replace(out, cosine=self._nearest_cosine(queries, out))
        device = view.keys.device
        return (
            out,
            torch.from_numpy(searched).to(device),
            torch.from_numpy(followed).to(device),
        )

    def score(
        self,
        sequences: Sequence[np.ndarray],
        *,
        full: bool = False,
        use_gate: bool = True,
        with_cosine: bool | None = None,
        on_progress: Progress = no_progress,
        stage: str = "score",
        top1: bool = False,
    ) -> Iterator[Scored]:
        """Every position of token ``sequences`` (int64 [n_i], BOS first: ``lm.encode``),
        scored batch by batch, in order. The search of a batch overlaps the LM's next one.

        Args:
            full: also keep the full distributions ([m, V] each; ``explain``).
            use_gate: let the gate skip searches (tuning searches everywhere).
            with_cosine: compute the cosine feature (default: when the policy needs it).
            on_progress: told the tokens scored so far, as ``stage``.
            top1: also say where each distribution's argmax is the token that came
                (``Scored.lm_correct``, ``Scored.correct``); it keeps the LM's log-probs
                of a batch until its search is done.
        """
        jobs = [
            (i, seq, w)
            for i, seq in enumerate(sequences)
            for w in sliding_windows(len(seq), window=self.window, stride=self.stride)
        ]
        total = sum(len(w.positions) for _, _, w in jobs)
        groups = [jobs[lo : lo + self.batch_size] for lo in range(0, len(jobs), self.batch_size)]
        options: dict[str, Any] = {"full": full, "use_gate": use_gate, "with_cosine": with_cosine}
        if top1:
            options["top1"] = True
        if self.pointer_min:  # the state of each text, carried from batch to batch in order
            options["pointers"] = PointerState()
        if self.cache is not None:
            options["cache_state"] = CacheState()
        scored = 0
        on_progress(stage, scored, total)
        with ThreadPoolExecutor(1, thread_name_prefix="knnlm-search") as pool:
            pending: Future[Scored] | None = None
            for group in groups:
                # meanwhile, the last batch searches
                view = self.lm_view(group, full=full or top1)
                if pending is not None:
                    done = pending.result()
                    scored += len(done)
                    on_progress(stage, scored, total)
                    yield done
                pending = pool.submit(self.finish, view, **options)
            if pending is not None:
                done = pending.result()
                scored += len(done)
                on_progress(stage, scored, total)
                yield done

    def evaluate(
        self, sequences: Sequence[np.ndarray], *, on_progress: Progress = no_progress
    ) -> EvalResult:
        """Perplexity and top-1 next-token accuracy of the LM alone and of the kNN-LM over
        token ``sequences``."""
        base_nll = knn_nll = lm_seconds = search_seconds = 0.0
        tokens = searches = zero = base_correct = knn_correct = 0
        followed: int | None = None
        for scored in self.score(sequences, on_progress=on_progress, stage="eval", top1=True):
            assert scored.lm_correct is not None and scored.correct is not None
            base_correct += int(scored.lm_correct.sum())
            knn_correct += int(scored.correct.sum())
            base_nll -= scored.lm.lm_target_log_prob.double().sum().item()
            knn_nll -= scored.log_prob.double().sum().item()
            zero += int(torch.isneginf(scored.log_prob).sum())
            tokens += len(scored)
            searches += int(scored.searched.sum())
            if scored.followed is not None:
                followed = (followed or 0) + int(scored.followed.sum())
            lm_seconds += scored.lm.lm_seconds
            search_seconds += scored.search_seconds
        if tokens == 0:
            raise CorpusError("nothing to evaluate: every text is shorter than 2 tokens")
        return EvalResult(
            tokens=tokens,
            base_nll=base_nll,
            knn_nll=knn_nll,
            lm_seconds=lm_seconds,
            search_seconds=search_seconds,
            queries=searches,
            zero_prob_tokens=zero,
            followed=followed,
            base_correct=base_correct,
            knn_correct=knn_correct,
        )


def _place(
    out: Neighbours, nexts: np.ndarray, found: Neighbours, found_next: np.ndarray, rows: np.ndarray
) -> tuple[Neighbours, np.ndarray]:
    """``found`` [b, w] and its ``next`` values [b, w] written into rows ``rows`` (int [b])
    of ``out`` and ``nexts`` [m, w'], in place when w <= w'; when w > w' (a union, or more
    pointers than k) both are first widened with missing neighbours. Returns the two."""
    width, have = found.token_ids.shape[1], out.token_ids.shape[1]
    if width > have:  # pad every row to the new width: -1 / inf / None, next -1
        wider = Neighbours.empty(len(out), width)
        assert wider.point_ids is not None and out.point_ids is not None
        wider.token_ids[:, :have] = out.token_ids
        wider.sq_distances[:, :have] = out.sq_distances
        wider.point_ids[:, :have] = out.point_ids
        out = Neighbours(wider.token_ids, wider.sq_distances, wider.point_ids)
        nexts = np.concatenate([nexts, np.full((len(nexts), width - have), -1, np.int64)], 1)
    assert out.point_ids is not None and found.point_ids is not None
    out.token_ids[rows, :width] = found.token_ids
    out.sq_distances[rows, :width] = found.sq_distances
    out.point_ids[rows, :width] = found.point_ids
    nexts[rows, :width] = found_next
    return out, nexts


# No pointers: a text's first position, or one after a gap or a skipped search (immutable).
_NO_POINTERS = Pointers(
    position=-1,
    ids=[],
    keys=np.zeros((0, 0), dtype=np.float32),
    values=np.zeros(0, dtype=np.int64),
    nexts=np.zeros(0, dtype=np.int64),
)


def perplexity(nll: float, tokens: int) -> float:
    """exp(nll / tokens): inf where the mean NLL is infinite or past float range."""
    mean = nll / tokens
    return math.exp(mean) if mean < 709.0 else math.inf


def lm_summary(lm_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log max-probability of each row of LM log-probs [n, V]: [n], [n]."""
    entropy = -(lm_log_probs.exp() * lm_log_probs).nan_to_num().sum(-1)
    return entropy, lm_log_probs.max(-1).values
