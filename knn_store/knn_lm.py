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
from knn_store.pointers import PointerState, PointerWalk
from knn_store.progress import Progress, no_progress
from knn_store.results import EvalResult
from knn_store.store.base import KnnStore, Neighbours, PointFilter
from knn_store.store.config import SearchOptions
from knn_store.windows import WindowJob, window_batches


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
    # float32 [m] each, with the document cache on: log p_cache(target) (-inf where the
    # cache holds nothing) and the weight it got (0 at a text's first position); else None
    cache_log_prob: torch.Tensor | None = None
    cache_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.lm.targets)


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
        self.retomaton = PointerWalk(store, k, pointer_min, self.search, self.filter)

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

    def knn_temperature(self, features: QueryFeatures) -> float | torch.Tensor:
        """The kNN softmax temperature at each position: ``self.temperature``, or float32
        [b] when the policy has a temperature head (T(x) = ``self.temperature`` * exp(g(x)),
        ``LearnedLambda``)."""
        return self.policy.temperatures(features, self.temperature)

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
                part = replace(part, cosine=self.nearest_cosine(chunk, part))
            parts.append(part)
        found = Neighbours.concat(parts, k=self.k)
        if len(rows) == len(queries):
            return found
        return found.scatter(rows, len(queries))

    def nearest_cosine(self, queries: np.ndarray, neighbours: Neighbours) -> np.ndarray:
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
        return self.next_token(lm_log_probs, keys, use_gate=use_gate)[0]

    def next_token(
        self, lm_log_probs: torch.Tensor, keys: torch.Tensor, *, use_gate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``next_token_log_probs`` [b, V] and the bool [b] mask of the positions searched
        (False where the gate skipped), for a caller that reports them."""
        entropy, max_log_prob = lm_summary(lm_log_probs)
        searched = (
            self.search_mask(entropy, max_log_prob)
            if use_gate
            else torch.ones(len(lm_log_probs), dtype=torch.bool, device=lm_log_probs.device)
        )
        if not searched.any():
            return lm_log_probs, searched
        neighbours = self.neighbours(keys, searched=None if searched.all() else searched)
        mixed = self.mix_neighbours(lm_log_probs, neighbours, entropy, max_log_prob, searched)
        return mixed, searched

    def mix_neighbours(
        self,
        lm_log_probs: torch.Tensor,
        neighbours: Neighbours,
        entropy: torch.Tensor,
        max_log_prob: torch.Tensor,
        searched: torch.Tensor | None,
    ) -> torch.Tensor:
        """The kNN-LM's log p float [b, V] of b positions from the LM's log p [b, V], their
        ``neighbours`` [b, w] and the LM's entropy and max log-prob [b]; rows where
        ``searched`` (bool [b]; None: all) is False keep the LM's distribution exactly."""
        features = self.features(neighbours, lm_entropy=entropy, lm_max_log_prob=max_log_prob)
        knn = knn_log_probs(
            features.sq_distances,
            features.token_ids,
            vocab_size=lm_log_probs.shape[-1],
            temperature=self.knn_temperature(features),
        )  # [b, V]
        mixed = interpolate(lm_log_probs, knn, self.policy(features))
        if searched is None:
            return mixed
        return torch.where(searched[:, None], mixed, lm_log_probs)

    # --- stateful generation: pointers and the document cache across decoding steps --------

    @property
    def uses_memory(self) -> bool:
        """Whether a position's distribution depends on the text before it beyond the LM's
        context: pointer following or the document cache is on. Generation then goes
        through a ``decode_memory.DecodeMemory``."""
        return bool(self.pointer_min) or self.cache is not None

    # --- the pipeline ----------------------------------------------------------------------

    def window_batches(
        self, sequences: Sequence[np.ndarray], *, interleave: bool = False
    ) -> list[list[WindowJob]]:
        """``windows.window_batches`` with this kNN-LM's window, stride and batch size."""
        return window_batches(
            sequences,
            window=self.window,
            stride=self.stride,
            batch_size=self.batch_size,
            interleave=interleave,
        )

    def lm_views(self, sequences: Sequence[np.ndarray]) -> Iterator[LMView]:
        """The LM's half of the pipeline alone, batch by batch (the base LM's cost)."""
        for batch in self.window_batches(sequences):
            yield self.lm_view(batch)

    def lm_view(self, group: list[WindowJob], *, full: bool = False) -> LMView:
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
        knn_t = self.knn_temperature(features)  # T, or float [m] with a temperature head
        knn_lp = knn_target_log_probs(
            features.sq_distances, features.token_ids, view.targets, temperature=knn_t
        )
        knn_full = mixed_full = None
        if full or top1:
            assert view.lm_log_probs is not None, "the view needs the LM's log-probs (full)"
            knn_full = knn_log_probs(
                features.sq_distances,
                features.token_ids,
                vocab_size=view.lm_log_probs.shape[-1],
                temperature=knn_t,
            )
            mixed_full = interpolate(view.lm_log_probs, knn_full, lmbda)
        log_prob = interpolate(view.lm_target_log_prob, knn_lp, lmbda)
        cache_lp = cache_weight = None
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
            cache_lp = cached.target_log_prob
            cache_weight = torch.where(cached.has_memory, self.cache.weight, 0.0).float()
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
            cache_log_prob=cache_lp,
            cache_weight=cache_weight,
        )

    def _search_or_follow(
        self,
        view: LMView,
        allowed: torch.Tensor,
        state: PointerState,
        *,
        with_cosine: bool | None,
    ) -> tuple[Neighbours, torch.Tensor, torch.Tensor]:
        """Neighbours of a view's positions with pointer following (``PointerWalk.walk``); positions
        where ``allowed`` (bool [m], the gate) is False get none, and their text's pointers
        are dropped. Returns the neighbours [m, w] and the bool [m] masks searched, followed.
        """
        queries = view.keys.detach().float().cpu().numpy()  # [m, dim]
        out, searched, followed = self.retomaton.walk(
            state,
            view.sequence,
            view.position,
            queries,
            view.targets.cpu().numpy(),
            allowed.cpu().numpy(),
        )
        if self.policy.needs_cosine if with_cosine is None else with_cosine:
            out = replace(out, cosine=self.nearest_cosine(queries, out))
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
        groups = self.window_batches(sequences)
        total = sum(len(w.positions) for group in groups for _, _, w in group)
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
        if not sequences:
            raise CorpusError("nothing to evaluate: no text was given (or every file was skipped)")
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


def lm_summary(lm_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log max-probability of each row of LM log-probs [n, V]: [n], [n]."""
    entropy = -(lm_log_probs.exp() * lm_log_probs).nan_to_num().sum(-1)
    return entropy, lm_log_probs.max(-1).values
