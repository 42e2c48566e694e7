"""A document cache (Grave et al. 2017, "Improving Neural Language Models with a Continuous
Cache"): the current text's own earlier positions as a second memory.

Technical text repeats its identifiers far beyond one window, and the datastore may not hold
the document at all. So each position also looks at the keys of the same text's earlier
positions (those of earlier windows too, up to ``size`` of them), whose values are the tokens
that followed them, all known by then. The cache's distribution is the kNN formula over that
candidate set with its own temperature, computed in process with no store round trip, and
mixes into the kNN-LM's with its own weight:

    log p = log((1 - w) * p_kNN-LM + w * p_cache)

A position with no earlier position (a text's first) keeps the kNN-LM's distribution.

Example:
    >>> import torch
    >>> cache = DocumentCache(temperature=1.0, weight=0.5, size=16)
    >>> state = CacheState()
    >>> keys = torch.tensor([[0.0], [0.0], [0.0]])        # three positions, equal keys
    >>> got = cache.target_log_probs(state, sequence=[0, 0, 0], position=[1, 2, 3],
    ...                              keys=keys, targets=torch.tensor([7, 7, 8]), vocab_size=9)
    >>> [round(float(x.exp()), 3) for x in got.target_log_prob]   # none, 1 of 1, 0 of 2
    [0.0, 1.0, 0.0]
    >>> got.has_memory.tolist()
    [False, True, True]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from knn_store.knn import interpolate, knn_log_probs, knn_target_log_probs


@dataclass(frozen=True)
class CacheScores:
    """What the cache says about m positions."""

    target_log_prob: torch.Tensor  # float32 [m], log p_cache(target); -inf where none
    log_probs: torch.Tensor | None  # float32 [m, V], when asked for
    has_memory: torch.Tensor  # bool [m], whether any earlier position was visible


@dataclass
class CacheState:
    """Per text (sequence index): its last ``size`` keys float32 [n, dim], their values
    int64 [n], and the position of the last one. One per scoring run; not thread-safe."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    last: dict[int, int] = field(default_factory=dict)


class DocumentCache:
    """Scores positions against their own text's earlier keys.

    Args:
        temperature: the cache's softmax temperature over -d^2 (finite, > 0).
        weight: its share w in the final mixture, in [0, 1].
        size: the most earlier positions kept per text (the oldest go first).
    """

    def __init__(self, *, temperature: float, weight: float, size: int = 4096) -> None:
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"`temperature` must be finite and positive, got {temperature}")
        if not 0 <= weight <= 1:
            raise ValueError(f"`weight` must lie in [0, 1], got {weight}")
        if size < 1:
            raise ValueError(f"`size` must be positive, got {size}")
        self.temperature = temperature
        self.weight = weight
        self.size = size

    def target_log_probs(
        self,
        state: CacheState,
        *,
        sequence: Sequence[int] | np.ndarray,
        position: Sequence[int] | np.ndarray,
        keys: torch.Tensor,
        targets: torch.Tensor,
        vocab_size: int,
        full: bool = False,
    ) -> CacheScores:
        """log p_cache(target) per position, and the whole distribution if ``full``; then
        the positions join ``state`` as memory for later ones.

        Args:
            state: the earlier positions of each text, updated here.
            sequence, position: int [m], each row's text and absolute position. Rows of one
                text must be consecutive positions; a gap after the state's last position
                starts that text's cache afresh.
            keys: float [m, dim], each row's query key.
            targets: int64 [m], the token that followed each row (its value as memory).
            vocab_size: V.

        Returns:
            ``CacheScores`` of the m rows.
        """
        seq = np.asarray(sequence, dtype=np.int64)
        pos = np.asarray(position, dtype=np.int64)
        m = len(seq)
        out = torch.full((m,), float("-inf"), dtype=torch.float32, device=keys.device)
        has = torch.zeros(m, dtype=torch.bool, device=keys.device)
        dist = (
            torch.full((m, vocab_size), float("-inf"), dtype=torch.float32, device=keys.device)
            if full
            else None
        )
        for s in np.unique(seq):  # one block per text, vectorised over its positions
            rows = np.flatnonzero(seq == s)
            rows = rows[np.argsort(pos[rows], kind="stable")]
            if np.any(np.diff(pos[rows]) != 1):
                raise ValueError("the positions of one text must be consecutive")
            first = int(pos[rows[0]])
            if state.last.get(int(s)) != first - 1:  # a new text, or a gap: start afresh
                state.keys.pop(int(s), None)
                state.values.pop(int(s), None)
            q = keys[rows].float()  # [r, dim]
            v = targets[rows]  # [r]
            old_k = state.keys.get(int(s), q[:0])  # [h, dim]
            old_v = state.values.get(int(s), v[:0])  # [h]
            mem_k = torch.cat([old_k, q])  # [h + r, dim]
            mem_v = torch.cat([old_v, v])  # [h + r]
            h, r = len(old_k), len(rows)
            d2 = _sq_distances(q, mem_k)  # [r, h + r]
            col = torch.arange(h + r, device=keys.device)[None, :]  # [1, h + r]
            me = h + torch.arange(r, device=keys.device)[:, None]  # [r, 1], own column
            visible = (col < me) & (col >= me - self.size)  # earlier, and within size
            ids = torch.where(visible, mem_v[None, :].expand(r, -1), torch.full_like(d2, -1).long())
            d2 = d2.masked_fill(~visible, float("inf"))
            has[rows] = visible.any(-1)
            out[rows] = knn_target_log_probs(d2, ids, v, temperature=self.temperature)
            if dist is not None:
                dist[rows] = knn_log_probs(
                    d2, ids, vocab_size=vocab_size, temperature=self.temperature
                )
            state.keys[int(s)] = mem_k[-self.size :].detach()
            state.values[int(s)] = mem_v[-self.size :]
            state.last[int(s)] = int(pos[rows[-1]])
        return CacheScores(out, dist, has)

    def mix(
        self, log_probs: torch.Tensor, cache_log_probs: torch.Tensor, has_memory: torch.Tensor
    ) -> torch.Tensor:
        """log((1 - w) p + w p_cache) of float [m] or [m, V] log-probs; rows without memory
        (bool [m] ``has_memory`` False: a text's first position) keep ``log_probs``."""
        w = torch.where(has_memory, self.weight, 0.0).float()  # [m]
        return interpolate(log_probs, cache_log_probs, w)


def _sq_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float32 [r, n] squared L2 between rows, computed in float64 (as exact as a search)."""
    q, k = queries.double(), keys.double()
    d2 = (q * q).sum(-1)[:, None] + (k * k).sum(-1)[None, :] - 2 * q @ k.T
    return d2.clamp_min(0).float()
