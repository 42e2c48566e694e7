"""What a generation carries from step to step when a position's distribution depends on the
text before it beyond the LM's context (``KnnLM.uses_memory``): each row's pointers (RetoMaton)
and document cache. ``generation.decode`` feeds it the prompts (``read_prompts``), scores each
step from it (``step``) and tells it the tokens drawn (``advance``), so that a step's
distribution is what ``KnnLM.score`` gives at that position of prompt plus tokens so far."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from knn_store.doc_cache import CacheState
from knn_store.knn_lm import KnnLM, lm_summary
from knn_store.pointers import PointerState
from knn_store.store.base import Neighbours


@dataclass(frozen=True)
class _PendingFollow:
    """One generation step's neighbours, kept until the sampled token says whom to follow."""

    rows: np.ndarray  # int64 [L], the generation's rows that stepped
    position: np.ndarray  # int64 [L], the position each scored
    neighbours: Neighbours  # [L, w]
    nexts: np.ndarray  # int64 [L, w], their successors' values (``pointers.follow``)
    allowed: np.ndarray  # bool [L], the gate's decisions


@dataclass
class DecodeMemory:
    """What one generation carries from step to step, per row (each row one text): the
    pointers (``pointers``) and the document cache (``cache``) of each row, keyed by row,
    so that rows never see each other's. Make one per generation with
    ``DecodeMemory.start``; not thread-safe.
    """

    knn_lm: KnnLM
    position: np.ndarray  # int64 [b], each row's newest position: the next step's query
    pointers: PointerState | None  # None: pointer following off
    cache: CacheState | None  # None: no document cache
    followed: np.ndarray  # bool [b], whether each row's last step followed pointers
    searched: np.ndarray  # bool [b], whether each row's last step searched the datastore
    pending: _PendingFollow | None = None  # the last step's, until ``advance``
    cache_rows: np.ndarray | None = None  # the rows the last step put into the cache

    @classmethod
    def start(cls, knn_lm: KnnLM, prompt_lengths: Sequence[int]) -> DecodeMemory:
        """A fresh memory for one generation of ``len(prompt_lengths)`` texts (rows) with
        ``knn_lm``; each row's first query is its prompt's last position."""
        return cls(
            knn_lm=knn_lm,
            position=np.asarray(prompt_lengths, dtype=np.int64) - 1,
            pointers=PointerState() if knn_lm.pointer_min else None,
            cache=CacheState() if knn_lm.cache is not None else None,
            followed=np.zeros(len(prompt_lengths), dtype=bool),
            searched=np.zeros(len(prompt_lengths), dtype=bool),
        )

    def read_prompts(
        self,
        *,
        sequence: np.ndarray,
        position: np.ndarray,
        keys: torch.Tensor,
        targets: np.ndarray,
        lm_log_probs: torch.Tensor | None,
        use_gate: bool = True,
    ) -> None:
        """Feed the prompts' own positions in, as eval walks a text's positions
        before the one it scores: the cache takes each position's key and next token, and
        pointer following walks them (searching or following, then following the prompt's
        true next token), so the first generated step starts from the state eval has there.

        Args:
            sequence, position: int64 [m], each prompt position's row and absolute position
                (0 .. prompt length - 2 of each row: those whose next token is known).
            keys: float [m, dim] of those positions.
            targets: int64 [m], the prompt token after each.
            lm_log_probs: float [m, V], the LM's log p there, for the gate (with pointers
                only; None when pointers are off).
        """
        knn = self.knn_lm
        if not len(sequence):
            return
        if self.pointers is not None:
            ok = np.ones(len(sequence), dtype=bool)
            if use_gate and knn.gate is not None:
                assert lm_log_probs is not None, "the gate needs the prompts' LM log-probs"
                ok = knn.search_mask(*lm_summary(lm_log_probs)).cpu().numpy()
            queries = keys.detach().float().cpu().numpy()  # [m, dim]
            knn.retomaton.walk(self.pointers, sequence, position, queries, targets, ok)
        if knn.cache is not None and self.cache is not None:
            knn.cache.target_log_probs(
                self.cache,
                sequence=sequence,
                position=position,
                keys=keys,
                targets=torch.as_tensor(targets, device=keys.device),
                vocab_size=knn.lm.vocab_size,
            )

    def step(
        self,
        rows: np.ndarray,
        lm_log_probs: torch.Tensor,
        keys: torch.Tensor,
        *,
        use_gate: bool = True,
    ) -> torch.Tensor:
        """The kNN-LM's log p float [L, V] at the newest position of ``rows`` (int [L]) of a
        generation, from the LM's log p [L, V] and keys [L, dim] there: what ``KnnLM.score``
        with ``full`` gives at that position of the text (prompt plus tokens so far). Pointer
        following takes each row's pointers, or searches (one batched search); the cache
        looks at the row's earlier positions. Call ``advance`` with the tokens that came
        before the next step. Without pointers and cache this is
        ``KnnLM.next_token_log_probs``.
        """
        knn = self.knn_lm
        rows = np.asarray(rows, dtype=np.int64)
        state = self.pointers
        if state is None:
            mixed, searched = knn.next_token(lm_log_probs, keys, use_gate=use_gate)
            self.searched[rows] = searched.cpu().numpy()
        else:
            entropy, max_log_prob = lm_summary(lm_log_probs)
            allowed = (
                knn.search_mask(entropy, max_log_prob)
                if use_gate
                else torch.ones(len(rows), dtype=torch.bool, device=lm_log_probs.device)
            )
            ok = allowed.cpu().numpy()  # [L]
            queries = keys.detach().float().cpu().numpy()  # [L, dim]
            position = self.position[rows]  # [L]
            neighbours, nexts, _, followed = knn.retomaton.step(state, rows, position, queries, ok)
            self.pending = _PendingFollow(rows, position, neighbours, nexts, ok)
            self.followed[rows] = followed
            self.searched[rows] = ok & ~followed
            if knn.policy.needs_cosine:
                neighbours = replace(neighbours, cosine=knn.nearest_cosine(queries, neighbours))
            mixed = knn.mix_neighbours(lm_log_probs, neighbours, entropy, max_log_prob, allowed)
        if knn.cache is not None and self.cache is not None:
            # the rows join the cache now with a placeholder value; ``advance`` writes in
            # the token that came (a position's own value never weighs in its distribution)
            cached = knn.cache.target_log_probs(
                self.cache,
                sequence=rows,
                position=self.position[rows],
                keys=keys,
                targets=torch.zeros(len(rows), dtype=torch.long, device=keys.device),
                vocab_size=lm_log_probs.shape[-1],
                full=True,
            )
            assert cached.log_probs is not None
            mixed = knn.cache.mix(mixed, cached.log_probs, cached.has_memory)
            self.cache_rows = rows
        return mixed

    def advance(self, tokens: np.ndarray) -> None:
        """Move past the last ``step``: ``tokens`` int64 [b] holds the
        token each row drew (< 0: the row drew none and ends). Pointer following follows
        the neighbours whose value is that token; the cache records it as the value of the
        position it followed. Every stepped row's position moves on by one."""
        knn = self.knn_lm
        tokens = np.asarray(tokens, dtype=np.int64)
        pending, self.pending = self.pending, None
        if pending is not None and self.pointers is not None:
            came = tokens[pending.rows]  # [L]
            knn.retomaton.advance(
                self.pointers,
                pending.rows,
                pending.position,
                pending.neighbours,
                pending.nexts,
                came,
                pending.allowed & (came >= 0),
            )
        cache_rows, self.cache_rows = self.cache_rows, None
        if cache_rows is not None and self.cache is not None:
            for row in cache_rows[tokens[cache_rows] >= 0]:  # one write per row
                self.cache.values[int(row)][-1] = int(tokens[row])
        stepped = pending.rows if pending is not None else cache_rows
        if stepped is not None:
            self.position[stepped] += 1
