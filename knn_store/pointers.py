"""Pointer following (RetoMaton, Alon et al. 2022): reuse the last step's neighbours instead
of searching again.

A neighbour of position t is a datastore point (document d, position p) whose value is the
token that followed p. When the token that really comes after t equals that value, the text
and the stored document agree for one more token, so the stored successor (d, p + 1) is a
likely neighbour of position t + 1. ``follow`` names those successors (their ids are
computable, see below); the next position then has the engine score them against its own
query (``pointer_neighbours``: ``KnnStore.score_ids``, an exact search restricted to them, no
key read into Python). When fewer than a threshold remain, the caller searches, and scores
the search's neighbours united with the pointers it has (``union_neighbours``), as the paper
does.

The successor's id needs its value, which the id of the point at p does not hold (see
``store.point_ids``): it is the payload field ``next``. The scoring of the pointers reads it
with them (``next`` only), so a step that followed pointers costs one engine request; after a
search, ``follow`` reads it for the matching neighbours only (a payload-only lookup of just
those), two requests. Leaving the pointers' ``next`` unread, for ``follow`` to look up for
the matching ones, was measured too (30k-point Edge collection, k = 1024, 300 pointers a
position): reading ``next`` with the scoring costs ~3 us a pointer, the lookup ~9 us a
matching one, so it wins once a third of the pointers match; on a run of followed
positions most of them do (the text copies a stored document), and on a server it also
saves a round trip.

Everything is vectorised over the texts of a batch (rows); a scoring run walks the positions
of each text in order and keeps the pointers per text in a ``PointerState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from knn_store.store.base import KnnStore, Neighbours, PointFilter
from knn_store.store.config import SearchOptions
from knn_store.store.point_ids import successor_ids

UNKNOWN = -2  # a neighbour's ``next`` not read yet (``follow`` reads it if it matches)


@dataclass(frozen=True)
class Pointers:
    """The successors followed from one position of a text: candidates for the next one.

    position: the text position whose neighbours they succeed; they serve position + 1.
    ids: point ids [n], each once (a successor the store lacks, as a filtered copy may,
        goes unscored: ``score_ids`` leaves it out); values: int64 [n], each point's value
        (its next token, which its id holds too).
    """

    position: int
    ids: list[str]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PointerState:
    """Pointers per text (by sequence index) across the batches of one scoring run, and
    the counts that say what following saved. Create one per run; it is not thread-safe."""

    by_sequence: dict[int, Pointers] = field(default_factory=dict)
    followed: int = 0  # positions scored from followed pointers
    searched: int = 0  # positions searched
    lookups: int = 0  # batched by-id requests made: ``next`` lookups and pointer scorings
    looked_up: int = 0  # points those requests named
    united: int = 0  # searched positions that had pointers, scored as the union
    added: int = 0  # pointers those unions added (not among the search's neighbours)

    def ready(self, sequence: int, position: int) -> Pointers | None:
        """The pointers for ``position`` of text ``sequence``, if its previous position left
        any (a gap in positions means none)."""
        found = self.by_sequence.get(sequence)
        return found if found is not None and found.position + 1 == position else None


def pointer_neighbours(
    store: KnnStore,
    queries: np.ndarray,
    pointers: list[Pointers],
    *,
    k: int,
    state: PointerState | None = None,
) -> tuple[Neighbours, np.ndarray]:
    """Neighbours of each query among its own followed pointers, as a search would report
    them: the engine's squared L2 to each pointer's key (``KnnStore.score_ids``, one batched
    request, the original keys), ascending, ties by token, padded to k. A point both
    searched and followed gets the same distance either way: the same engine arithmetic.

    Args:
        store: the collection the pointers point into.
        queries: float32 [b, dim].
        pointers: b sets of pointers, one per query (each at most k; more are cut to the k
            nearest).
        k: the row width.
        state: counts the request, when given.

    Returns:
        ``Neighbours`` [b, k] with point ids, and the pointers' ``next`` values int64
        [b, k] (read with them; -1 where there is no pointer or no successor), in the same
        order.
    """
    named = sum(len(p) for p in pointers)
    found, nexts = store.score_ids(queries, [p.ids for p in pointers], k=k)
    if named:
        _count(state, named)
    return found, nexts


def union_neighbours(
    searched: Neighbours, followed: Neighbours, followed_next: np.ndarray, *, width: int
) -> tuple[Neighbours, np.ndarray]:
    """A search's neighbours joined with the pointers followed to the same positions, as
    RetoMaton does where too few pointers remain to skip the search (Alon et al. 2022,
    Algorithm 1: the new states are the followed ones *united* with the retrieved ones).

    All of the union is kept, as in the paper, not its k nearest: a row holds at most the
    search's k plus the fewer than ``pointer_min`` pointers that made it search, so the
    caller sizes ``width`` to k + the most pointers of a row. A point both found and
    followed appears once, with the distance its scoring gave (exact; a quantized search's
    is approximate).

    Args:
        searched: the search's ``Neighbours`` [b, k] with point ids.
        followed: the same rows' pointers as ``pointer_neighbours`` scored them [b, P] (rows
            without pointers empty); ids as the same engine returns them, so one point's
            ids compare equal.
        followed_next: their ``next`` values int64 [b, P].
        width: the output row width; at least k + the most pointers of a row.

    Returns:
        ``Neighbours`` [b, width] ascending (ties by token), and the ``next`` values int64
        [b, width]: ``UNKNOWN`` for the search's points, the pointers' own otherwise.
    """
    assert searched.point_ids is not None and followed.point_ids is not None
    b, k = searched.token_ids.shape
    counts = (followed.token_ids >= 0).sum(axis=1)  # [b], pointers scored per row
    most = int(counts.max(initial=0))
    if k + most > width:
        raise ValueError(f"`width` {width} cannot hold k={k} neighbours and {most} pointers")
    tokens = searched.token_ids.copy()  # [b, k]
    d2 = searched.sq_distances.copy()
    ids = searched.point_ids.copy()
    for r in np.flatnonzero(counts):  # drop the search's copy of a followed point
        mine = set(followed.point_ids[r, : counts[r]].tolist())
        dup = np.fromiter((i in mine for i in ids[r]), dtype=bool, count=k)  # [k]
        tokens[r, dup], d2[r, dup], ids[r, dup] = -1, np.inf, None
    tokens = np.concatenate([tokens, followed.token_ids[:, :most]], axis=1)  # [b, k + most]
    d2 = np.concatenate([d2, followed.sq_distances[:, :most]], axis=1)
    ids = np.concatenate([ids, followed.point_ids[:, :most]], axis=1)
    searched_next = np.full((b, k), UNKNOWN, dtype=np.int64)
    nexts = np.concatenate([searched_next, followed_next[:, :most]], axis=1)
    # ascending distance, ties by token (as a search orders them); missing ones (inf) last
    order = np.lexsort((tokens, d2), axis=-1)[:, :width]  # [b, <= width]
    out = Neighbours.empty(b, width)
    assert out.point_ids is not None
    n = order.shape[1]
    out.token_ids[:, :n] = np.take_along_axis(tokens, order, 1)
    out.sq_distances[:, :n] = np.take_along_axis(d2, order, 1)
    out.point_ids[:, :n] = np.take_along_axis(ids, order, 1)
    out_next = np.full((b, width), -1, dtype=np.int64)
    out_next[:, :n] = np.take_along_axis(nexts, order, 1)
    missing = out.point_ids == None  # noqa: E711  [b, width]
    out_next[missing] = -1
    return Neighbours(out.token_ids, out.sq_distances, out.point_ids), out_next


def follow(
    store: KnnStore,
    *,
    positions: np.ndarray,
    point_ids: np.ndarray,
    token_ids: np.ndarray,
    nexts: np.ndarray,
    targets: np.ndarray,
    state: PointerState | None = None,
) -> list[Pointers]:
    """The successors of the neighbours whose value is the token that came: their ids and
    values, computed from the neighbours' ids and ``next`` values, with no key read.

    Args:
        store: the collection (with ``meta.successors``).
        positions: int64 [b], the text position each row scored.
        point_ids: object [b, k], the neighbours of each row (None = missing).
        token_ids: int64 [b, k], their values.
        nexts: int64 [b, k], their successors' values where known, ``UNKNOWN`` where not
            read yet (read here, for the matching neighbours only), -1 where they have no
            successor.
        targets: int64 [b], the token that came after each row's position.
        state: counts the lookups, when given.

    Returns:
        b ``Pointers``, those of row i for position positions[i] + 1 (possibly empty).
    """
    b, _ = token_ids.shape
    # a missing neighbour's value is -1, which no target is: only the matches' ids are checked
    rows, cols = np.nonzero(token_ids == targets[:, None])  # [M] each, row-major
    real = np.fromiter((p is not None for p in point_ids[rows, cols]), dtype=bool, count=len(rows))
    rows, cols = rows[real], cols[real]
    succ_values = nexts[rows, cols]  # [M], int64 (a copy)
    unknown = succ_values == UNKNOWN  # [M]
    if unknown.any():  # read the matches' `next` (payload only)
        wanted = point_ids[rows[unknown], cols[unknown]].tolist()
        succ_values[unknown] = store.retrieve_arrays(wanted).nexts
        _count(state, len(wanted))
    live = succ_values >= 0  # [M], with a successor
    rows, cols, succ_values = rows[live], cols[live], succ_values[live]  # [N] each
    succ = successor_ids(point_ids[rows, cols].tolist(), succ_values)  # [N]
    bounds = np.searchsorted(rows, np.arange(b + 1))  # [b + 1]: rows are ascending
    return [
        Pointers(position=int(positions[r]), ids=succ[lo:hi], values=succ_values[lo:hi])
        for r, (lo, hi) in enumerate(pairwise(bounds))
    ]


def _count(state: PointerState | None, points: int) -> None:
    if state is not None:
        state.lookups += 1
        state.looked_up += points


@dataclass(frozen=True)
class PointerWalk:
    """RetoMaton over the positions of texts: at each position, follow the pointers the
    last one left where at least ``pointer_min`` of them are in the store, else search
    (``k`` neighbours, with ``search`` and ``filter``); then keep the successors of the
    neighbours whose value is the token that came. ``KnnLM`` holds one."""

    store: KnnStore
    k: int
    pointer_min: int
    search: SearchOptions
    filter: PointFilter

    def walk(
        self,
        state: PointerState,
        sequence: np.ndarray,
        position: np.ndarray,
        queries: np.ndarray,
        targets: np.ndarray,
        allowed: np.ndarray,
    ) -> tuple[Neighbours, np.ndarray, np.ndarray]:
        """RetoMaton over m positions of some texts whose next tokens are known: each
        position takes its neighbours (``step``), then its text follows the token
        that came (``advance``).

        A text's positions depend on each other, so they go one step at a time; each step
        takes the next position of every text at once (one engine scoring of the pointers,
        one search, and after the search one lookup of the matches' ``next``).

        Args:
            state: the pointers each text's earlier positions left; updated.
            sequence, position: int64 [m], each row's text and absolute position.
            queries: float32 [m, dim]; targets: int64 [m], the token after each position.
            allowed: bool [m], False where the gate skips (no neighbours, pointers dropped).

        Returns:
            The neighbours [m, w] (w >= k the widest row: a union, or all the pointers
            followed; the rest padded) and the bool [m] masks searched, followed.
        """
        m = len(sequence)
        out = Neighbours.empty(m, self.k)
        nexts = np.full((m, self.k), UNKNOWN, dtype=np.int64)  # [m, k], see follow
        searched = np.zeros(m, dtype=bool)
        followed = np.zeros(m, dtype=bool)
        # each text's rows in position order; ``step`` is a row's rank within its text
        order = np.lexsort((position, sequence))  # [m]
        text = sequence[order]
        starts = np.flatnonzero(np.r_[True, text[1:] != text[:-1]])  # first row of each text
        step = np.arange(m) - np.repeat(starts, np.diff(np.r_[starts, m]))  # [m]
        for s in range(int(step.max()) + 1 if m else 0):
            rows = order[step == s]  # [L], one per text
            found, found_next, searched[rows], followed[rows] = self.step(
                state, sequence[rows], position[rows], queries[rows], allowed[rows]
            )
            out, nexts = _place(out, nexts, found, found_next, rows)
            self.advance(
                state,
                sequence[rows],
                position[rows],
                found,
                found_next,
                targets[rows],
                allowed[rows],
            )
        return out, searched, followed

    def step(
        self,
        state: PointerState,
        sequence: np.ndarray,
        position: np.ndarray,
        queries: np.ndarray,
        allowed: np.ndarray,
    ) -> tuple[Neighbours, np.ndarray, np.ndarray, np.ndarray]:
        """Neighbours of one position of each of L texts: the pointers its text's previous
        position left, scored by the engine (one batched request for every row that has
        any), if at least ``pointer_min`` of them are in the store; else one batched search
        for all such rows, scoring the search's neighbours united with the pointers the row
        had (``union_neighbours``, as RetoMaton does). Rows where ``allowed`` is
        False get neither.

        Args:
            state: the pointers of each text (read; its counts are updated).
            sequence, position: int64 [L], each row's text and absolute position.
            queries: float32 [L, dim].
            allowed: bool [L], the gate's decisions.

        Returns:
            ``Neighbours`` [L, w] (w >= k), their ``next`` values int64 [L, w] (for
            ``advance``), and the bool [L] masks searched, followed.
        """
        n = len(sequence)
        ready = [
            state.ready(int(s), int(p)) or NO_POINTERS
            for s, p in zip(sequence, position, strict=True)
        ]
        has = allowed & np.array([len(p) > 0 for p in ready], dtype=bool)  # [L]
        out = Neighbours.empty(n, self.k)
        nexts = np.full((n, self.k), UNKNOWN, dtype=np.int64)  # [L, k]
        # every row's pointers scored at once: those that remain decide, and a row that
        # searches anyway unites them with its search's neighbours
        pointed = Neighbours.empty(n, 1)  # [L, P], rows without pointers empty
        pointed_next = np.full((n, 1), -1, dtype=np.int64)
        if has.any():
            mine = [p for p, h in zip(ready, has, strict=True) if h]
            width = max(self.k, *(len(p) for p in mine))
            found, found_next = pointer_neighbours(
                self.store, queries[has], mine, k=width, state=state
            )
            pointed, pointed_next = _place(
                Neighbours.empty(n, width),
                np.full((n, width), -1, dtype=np.int64),
                found,
                found_next,
                has,
            )
        present = (pointed.token_ids >= 0).sum(axis=1)  # [L], pointers in the store
        use = allowed & (present >= self.pointer_min)  # [L]; pointer_min >= 1
        look = allowed & ~use  # [L]
        if use.any():
            out, nexts = _place(out, nexts, *_rows(pointed, pointed_next, use), use)
        if look.any():
            found = self.store.search(
                queries[look], k=self.k, options=self.search, filter=self.filter
            )
            found_next = np.full(found.token_ids.shape, UNKNOWN, dtype=np.int64)
            most = int(present[look].max())
            if most:  # fewer than pointer_min pointers, but some: score the union
                before = int((found.token_ids >= 0).sum())
                found, found_next = union_neighbours(
                    found, *_rows(pointed, pointed_next, look), width=self.k + most
                )
                state.united += int((present[look] > 0).sum())
                state.added += int((found.token_ids >= 0).sum()) - before
            out, nexts = _place(out, nexts, found, found_next, look)
        state.followed += int(use.sum())
        state.searched += int(look.sum())
        return out, nexts, look, use

    def advance(
        self,
        state: PointerState,
        sequence: np.ndarray,
        position: np.ndarray,
        neighbours: Neighbours,
        nexts: np.ndarray,
        came: np.ndarray,
        allowed: np.ndarray,
    ) -> None:
        """After one position of each of L texts (``step``'s ``neighbours`` and
        ``nexts`` [L, w]): each text keeps the successors of the neighbours whose value is
        the token that came (``came`` int64 [L]: the true one in eval, the sampled one in
        generation) for its next position. Rows where ``allowed`` (bool [L]) is False
        drop their text's pointers."""
        active = np.flatnonzero(allowed)
        if len(active):
            assert neighbours.point_ids is not None
            successors = follow(
                self.store,
                positions=position[active],
                point_ids=neighbours.point_ids[active],
                token_ids=neighbours.token_ids[active],
                nexts=nexts[active],
                targets=came[active],
                state=state,
            )
            for text, pointers in zip(sequence[active], successors, strict=True):
                state.by_sequence[int(text)] = pointers
        for text in sequence[~allowed]:
            state.by_sequence.pop(int(text), None)


def _rows(
    neighbours: Neighbours, nexts: np.ndarray, rows: np.ndarray
) -> tuple[Neighbours, np.ndarray]:
    """Rows ``rows`` (int [b] or bool [m]) of ``neighbours`` [m, w] and ``nexts`` [m, w]."""
    assert neighbours.point_ids is not None
    return Neighbours(
        neighbours.token_ids[rows], neighbours.sq_distances[rows], neighbours.point_ids[rows]
    ), nexts[rows]


def _place(
    out: Neighbours, nexts: np.ndarray, found: Neighbours, found_next: np.ndarray, rows: np.ndarray
) -> tuple[Neighbours, np.ndarray]:
    """``found`` [b, w] and its ``next`` values [b, w] written into rows ``rows`` (int [b],
    or bool [m] with b True) of ``out`` and ``nexts`` [m, w'], in place when w <= w'; when
    w > w' (a union, or more pointers than k) both are first widened with missing
    neighbours. Returns the two."""
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
NO_POINTERS = Pointers(position=-1, ids=[], values=np.zeros(0, dtype=np.int64))
