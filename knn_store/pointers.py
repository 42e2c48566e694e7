"""Pointer following (RetoMaton, Alon et al. 2022): reuse the last step's neighbours instead
of searching again.

A neighbour of position t is a datastore point (document d, position p) whose value is the
token that followed p. When the token that really comes after t equals that value, the text
and the stored document agree for one more token, so the stored successor (d, p + 1) is a
likely neighbour of position t + 1. ``follow`` collects those successors, with their keys, in
one batched lookup; the next position then scores them against its own query
(``pointer_neighbours``: exact squared distances to the successors' keys, no search). When
fewer than a threshold remain, the caller searches, and scores the search's neighbours
united with the pointers it has (``union_neighbours``), as the paper does.

The successor's id needs its value, which the id of the point at p does not hold (see
``store.point_ids``): it is the payload field ``next``. A followed point brings its ``next``
along with its key, so a step that followed pointers costs one lookup; after a search, the
matching neighbours' ``next`` is read first (a payload-only lookup of just those), then the
successors, two lookups.

Everything is vectorised over the texts of a batch (rows); a scoring run walks the positions
of each text in order and keeps the pointers per text in a ``PointerState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from knn_store.store.base import NEXT_FIELD, KnnStore, Neighbours
from knn_store.store.point_ids import successor_ids

UNKNOWN = -2  # a neighbour's ``next`` not read yet (it came from a search)


@dataclass(frozen=True)
class Pointers:
    """The successors followed from one position of a text: candidates for the next one.

    position: the text position whose neighbours they succeed; they serve position + 1.
    ids: point ids [n]; keys: float32 [n, dim]; values: int64 [n] (each point's next token);
    nexts: int64 [n], each point's own successor's value (-1 where it has none).
    """

    position: int
    ids: list[str]
    keys: np.ndarray
    values: np.ndarray
    nexts: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PointerState:
    """Pointers per text (by sequence index) across the batches of one scoring run, and
    the counts that say what following saved. Create one per run; it is not thread-safe."""

    by_sequence: dict[int, Pointers] = field(default_factory=dict)
    followed: int = 0  # positions scored from followed pointers
    searched: int = 0  # positions searched
    lookups: int = 0  # batched by-id lookups made
    looked_up: int = 0  # points read by those lookups
    united: int = 0  # searched positions that had pointers, scored as the union
    added: int = 0  # pointers those unions added (not among the search's neighbours)

    def ready(self, sequence: int, position: int) -> Pointers | None:
        """The pointers for ``position`` of text ``sequence``, if its previous position left
        any (a gap in positions means none)."""
        found = self.by_sequence.get(sequence)
        return found if found is not None and found.position + 1 == position else None


def pointer_neighbours(
    queries: np.ndarray, pointers: list[Pointers], *, k: int
) -> tuple[Neighbours, np.ndarray]:
    """Neighbours of each query among its own followed pointers, as a search would report
    them: squared L2 to each pointer's key, ascending, padded to k.

    Args:
        queries: float32 [b, dim].
        pointers: b sets of pointers, one per query (each at most k; more are cut to the k
            nearest).
        k: the row width.

    Returns:
        ``Neighbours`` [b, k] with point ids, and the pointers' ``next`` values int64 [b, k]
        (-1 where there is no pointer), in the same order.
    """
    b = len(pointers)
    sizes = np.array([len(p) for p in pointers], dtype=np.int64)  # [b]
    token_ids = np.full((b, k), -1, dtype=np.int64)
    sq_distances = np.full((b, k), np.inf, dtype=np.float32)
    point_ids = np.full((b, k), None, dtype=object)
    nexts = np.full((b, k), -1, dtype=np.int64)
    if sizes.sum() == 0:
        return Neighbours(token_ids, sq_distances, point_ids), nexts
    row = np.repeat(np.arange(b), sizes)  # [N], each pointer's query
    keys = np.concatenate([p.keys for p in pointers if len(p)])  # [N, dim]
    diff = keys.astype(np.float64) - queries[row].astype(np.float64)  # [N, dim]
    d2 = np.einsum("nd,nd->n", diff, diff).astype(np.float32)  # [N]
    values = np.concatenate([p.values for p in pointers if len(p)])  # [N]
    nxt = np.concatenate([p.nexts for p in pointers if len(p)])  # [N]
    ids = np.array([i for p in pointers for i in p.ids], dtype=object)  # [N]
    # ascending distance per row, ties by token, as neighbours_from_hits orders a search
    order = np.lexsort((values, d2, row))  # [N], grouped by row
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # [b], first pointer of each row
    rank = np.arange(len(order)) - start[row[order]]  # [N], place within its row
    keep = rank < k
    r, c, src = row[order][keep], rank[keep], order[keep]
    token_ids[r, c] = values[src]
    sq_distances[r, c] = d2[src]
    point_ids[r, c] = ids[src]
    nexts[r, c] = nxt[src]
    return Neighbours(token_ids, sq_distances, point_ids), nexts


def union_neighbours(
    queries: np.ndarray, searched: Neighbours, pointers: list[Pointers], *, width: int
) -> tuple[Neighbours, np.ndarray]:
    """A search's neighbours joined with the pointers followed to the same positions, as
    RetoMaton does where too few pointers remain to skip the search (Alon et al. 2022,
    Algorithm 1: the new states are the followed ones *united* with the retrieved ones).

    All of the union is kept, as in the paper, not its k nearest: a row holds at most the
    search's k plus the fewer than ``pointer_min`` pointers that made it search, so the
    caller sizes ``width`` to k + pointer_min - 1. A point both found and followed appears
    once, with the exact distance to its key (a quantized search's distance is approximate).

    Args:
        queries: float32 [b, dim].
        searched: the search's ``Neighbours`` [b, k] with point ids.
        pointers: b sets of pointers (possibly empty), one per query.
        width: the output row width; at least k + the largest set of pointers.

    Returns:
        ``Neighbours`` [b, width] ascending (ties by token), and the ``next`` values int64
        [b, width]: ``UNKNOWN`` for the search's points, the pointers' own otherwise.
    """
    assert searched.point_ids is not None
    b, k = searched.token_ids.shape
    most = max((len(p) for p in pointers), default=0)
    if k + most > width:
        raise ValueError(f"`width` {width} cannot hold k={k} neighbours and {most} pointers")
    near, near_next = pointer_neighbours(queries, pointers, k=max(most, 1))  # [b, P]
    assert near.point_ids is not None
    tokens = searched.token_ids.copy()  # [b, k]
    d2 = searched.sq_distances.copy()
    ids = searched.point_ids.copy()
    for r, p in enumerate(pointers):  # drop the search's copy of a followed point
        if len(p):
            # ids as text: an engine's UUID objects and a lookup's strings compare equal
            dup = np.isin(ids[r].astype(str), np.asarray(p.ids, dtype=str))  # [k]
            tokens[r, dup], d2[r, dup], ids[r, dup] = -1, np.inf, None
    tokens = np.concatenate([tokens, near.token_ids], axis=1)  # [b, k + P]
    d2 = np.concatenate([d2, near.sq_distances], axis=1)
    ids = np.concatenate([ids, near.point_ids], axis=1)
    nexts = np.concatenate([np.full((b, k), UNKNOWN, dtype=np.int64), near_next], axis=1)
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
    """The successors of the neighbours whose value is the token that came.

    Args:
        store: the collection (with ``meta.successors``).
        positions: int64 [b], the text position each row scored.
        point_ids: object [b, k], the neighbours of each row (None = missing).
        token_ids: int64 [b, k], their values.
        nexts: int64 [b, k], their successors' values where known, ``UNKNOWN`` where they
            came from a search (read here), -1 where they have no successor.
        targets: int64 [b], the token that came after each row's position.
        state: counts the lookups, when given.

    Returns:
        b ``Pointers``, those of row i for position positions[i] + 1 (possibly empty).
    """
    b, _ = token_ids.shape
    hit = (token_ids == targets[:, None]) & (point_ids != None)  # noqa: E711  [b, k]
    nexts = nexts.copy()
    unknown = hit & (nexts == UNKNOWN)  # [b, k]
    if unknown.any():  # neighbours from a search: read their `next` (payload only)
        wanted = point_ids[unknown].tolist()
        found = store.retrieve(wanted, with_keys=False, with_payload=[NEXT_FIELD])
        nexts[unknown] = [_next_of(found.get(str(i))) for i in wanted]
        _count(state, len(wanted))
    live = hit & (nexts >= 0)  # [b, k], matched and with a successor
    rows, cols = np.nonzero(live)  # [N] each
    dim = store.meta.dim if store.meta is not None else 0
    if len(rows) == 0:
        return [_empty(int(p), dim) for p in positions]
    succ = successor_ids(point_ids[rows, cols].tolist(), nexts[rows, cols])  # [N]
    found = store.retrieve(succ, with_keys=True, with_payload=[NEXT_FIELD])
    _count(state, len(succ))
    present = np.array([s in found for s in succ], dtype=bool)  # [N]; a filtered copy lacks some
    rows, succ_values = rows[present], nexts[rows, cols][present]
    kept = [s for s, p in zip(succ, present, strict=True) if p]
    keys = np.asarray([found[s].key for s in kept], dtype=np.float32).reshape(len(kept), dim)
    succ_nexts = np.array([_next_of(found[s]) for s in kept], dtype=np.int64)
    out = []
    for r in range(b):  # one slice per text, not per neighbour
        sel = np.flatnonzero(rows == r)
        out.append(
            Pointers(
                position=int(positions[r]),
                ids=[kept[i] for i in sel],
                keys=keys[sel],
                values=succ_values[sel],
                nexts=succ_nexts[sel],
            )
        )
    return out


def _next_of(point: object) -> int:
    """A stored point's ``next`` field; -1 when it is absent (a point written without it)."""
    payload = getattr(point, "payload", None) or {}
    value = payload.get(NEXT_FIELD, -1)
    return int(value) if isinstance(value, int) else -1


def _empty(position: int, dim: int) -> Pointers:
    return Pointers(
        position=position,
        ids=[],
        keys=np.zeros((0, dim), dtype=np.float32),
        values=np.zeros(0, dtype=np.int64),
        nexts=np.zeros(0, dtype=np.int64),
    )


def _count(state: PointerState | None, points: int) -> None:
    if state is not None:
        state.lookups += 1
        state.looked_up += points
