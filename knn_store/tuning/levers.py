"""The levers fitted for a saved policy: the document cache's weight and temperature, and
the pointer-following threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from knn_store.errors import CorpusError
from knn_store.knn import interpolate
from knn_store.knn_lm import KnnLM, LMView
from knn_store.progress import Progress, no_progress

CACHE_TEMPERATURE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # times the policy's T
CACHE_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)  # 0: the cache off, if nothing beats it
POINTER_THRESHOLDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # those <= k are tried


@dataclass(frozen=True)
class LeverFit:
    """The document cache and pointer threshold fitted for one policy on validation.

    ``cache_nll`` [T, W] is the mean NLL of every cache temperature and weight of the grid
    (no pointers); ``pointer_nll`` and ``pointer_saved`` give, per threshold tried
    (ascending, 0 first: pointers off), the mean NLL with the chosen cache and the share of
    positions scored from followed pointers instead of a search.
    """

    cache_temperature: float | None  # None: the cache is off (weight 0 won)
    cache_weight: float
    cache_temperatures: list[float]
    cache_weights: list[float]
    cache_nll: list[list[float]]
    pointer_min: int  # 0: no threshold saves a search within the budget, or none tried
    thresholds: list[int]
    pointer_nll: list[float]
    pointer_saved: list[float]
    tokens: int

    @property
    def nll(self) -> float:
        """Mean NLL of the chosen cache and threshold on validation."""
        return self.pointer_nll[self.thresholds.index(self.pointer_min)]

    @property
    def searches_saved(self) -> float:
        return self.pointer_saved[self.thresholds.index(self.pointer_min)]


def fit_levers(
    knn_lm: KnnLM,
    sequences: Sequence[np.ndarray],
    *,
    max_cost: float,
    pointers: bool,
    on_progress: Progress = no_progress,
) -> LeverFit:
    """Fit the document cache (temperature and weight) and the pointer threshold for
    ``knn_lm``, which carries the fitted policy, T and gate, on validation ``sequences``.

    One LM pass keeps each batch's view (keys and LM summaries, not the [m, V]
    distributions) and scores it without pointers and under every cache temperature. The
    cache is position-wise, mixed after the kNN-LM, so its grid is tensor math on each
    temperature's log p_cache(target); it is fitted first, by perplexity, without pointers.

    Pointer following is a walk from position to position, so a threshold cannot be swept
    on cached evidence: each threshold tried is a run over the kept views, in ``score``'s
    order, the one ``knnlm eval`` makes. A lower threshold follows more and saves more
    searches, and costs more perplexity, so the threshold that saves the most searches
    while the validation perplexity (with the cache) rises by at most ``max_cost`` (0.005 =
    0.5%) over no pointers is found by bisection over ``POINTER_THRESHOLDS``: about
    log2(11) runs instead of 11 (it assumes the cost does not rise with the threshold, as
    measured on kernel docs). ``pointers=False`` (a collection without successor links)
    tries none.
    """
    from knn_store.doc_cache import CacheState, DocumentCache
    from knn_store.pointers import PointerState

    if not 0 <= max_cost < math.inf:
        raise ValueError(f"`max_cost` must be finite and >= 0, got {max_cost}")
    temps = [knn_lm.temperature * f for f in CACHE_TEMPERATURE_FACTORS]
    caches = [DocumentCache(temperature=t, weight=0.0) for t in temps]
    cache_states = [CacheState() for _ in temps]
    plain = knn_lm.with_options(pointer_min=0, cache=None)
    batches = knn_lm.window_batches(sequences)
    total = sum(len(w.positions) for batch in batches for _, _, w in batch)
    views: list[LMView] = []
    plain_lp: list[torch.Tensor] = []  # float32 [m] per batch, no pointers
    cache_lp: list[list[torch.Tensor]] = [[] for _ in temps]
    has_memory: list[torch.Tensor] = []
    done = 0
    on_progress("levers", done, total)
    for batch in batches:
        view = knn_lm.lm_view(batch)
        views.append(view)
        plain_lp.append(plain.finish(view).log_prob.cpu())
        for cache, state, out in zip(caches, cache_states, cache_lp, strict=True):
            got = cache.target_log_probs(
                state,
                sequence=view.sequence,
                position=view.position,
                keys=view.keys,
                targets=view.targets,
                vocab_size=knn_lm.lm.vocab_size,
            )
            out.append(got.target_log_prob.cpu())
        has_memory.append(got.has_memory.cpu())
        done += len(view.targets)
        on_progress("levers", done, total)
    if not done:
        raise CorpusError("nothing to tune on: every text is shorter than 2 tokens")
    cached = torch.stack([torch.cat(parts) for parts in cache_lp])  # [T, n]
    has = torch.cat(has_memory)  # [n]

    def mixed_nll(lp: torch.Tensor, cache_row: torch.Tensor, weight: float) -> float:
        w = torch.where(has, weight, 0.0).float()  # as DocumentCache.mix
        return -interpolate(lp, cache_row, w).double().mean().item()

    base = torch.cat(plain_lp)  # [n]
    grid = [[mixed_nll(base, cached[ti], w) for w in CACHE_WEIGHTS] for ti in range(len(temps))]
    flat = torch.tensor(grid, dtype=torch.float64)  # [T, W]
    ti, wi = divmod(int(flat.argmin()), len(CACHE_WEIGHTS))  # the first of ties
    weight = CACHE_WEIGHTS[wi]
    row = cached[ti]
    tried: dict[int, tuple[float, float]] = {0: (mixed_nll(base, row, weight), 0.0)}
    budget = tried[0][0] + math.log1p(max_cost)

    def run(threshold: int) -> tuple[float, float]:
        """Validation NLL (with the cache) and share of positions followed at a threshold."""
        if threshold not in tried:
            follower = knn_lm.with_options(pointer_min=threshold, cache=None)
            state = PointerState()
            stage, scored, parts = f"pointers >= {threshold}", 0, []
            on_progress(stage, scored, total)
            for view in views:
                parts.append(follower.finish(view, pointers=state).log_prob.cpu())
                scored += len(view.targets)
                on_progress(stage, scored, total)
            tried[threshold] = (mixed_nll(torch.cat(parts), row, weight), state.followed / done)
        return tried[threshold]

    # from the least following down, while each fits: the lowest of that unbroken run
    best = 0
    for threshold in reversed([t for t in POINTER_THRESHOLDS if pointers and t <= knn_lm.k]):
        nll, saved = run(threshold)
        if nll > budget:
            break
        if saved > 0:  # a threshold that never follows changes nothing: walk on
            best = threshold
    thresholds = sorted(tried)
    return LeverFit(
        cache_temperature=temps[ti] if weight else None,
        cache_weight=weight,
        cache_temperatures=temps,
        cache_weights=list(CACHE_WEIGHTS),
        cache_nll=grid,
        pointer_min=best,
        thresholds=thresholds,
        pointer_nll=[tried[t][0] for t in thresholds],
        pointer_saved=[tried[t][1] for t in thresholds],
        tokens=done,
    )
