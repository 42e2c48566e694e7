"""Sliding windows over a token sequence, shared by ingest and eval.

Position p (0 <= p < n-1) predicts token p+1. Windows of W tokens advance by S; each window
scores only the positions the previous one did not, so every position is scored exactly once
and, past the first window, sees at least W-S tokens of context. The last window is pulled
back to end at the sequence's end, which gives its positions more context, never less.

>>> [(w.start, w.end, w.first) for w in sliding_windows(10, window=4, stride=2)]
[(0, 4, 0), (2, 6, 3), (4, 8, 5), (6, 10, 7)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) go through the LM; positions [first, end-1) are scored."""

    start: int
    end: int
    first: int

    @property
    def positions(self) -> np.ndarray:
        """int64 [m] absolute positions this window scores."""
        return np.arange(self.first, self.end - 1, dtype=np.int64)


def sliding_windows(n: int, *, window: int, stride: int) -> Iterator[Window]:
    """Windows covering the n-1 predictions of a sequence of n tokens."""
    if window < 2:
        raise ValueError(f"`window` must be at least 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"`stride` must lie in [1, window={window}], got {stride}")
    if n < 2:
        return
    start, scored_until = 0, 0  # positions < scored_until are done
    while True:
        end = min(start + window, n)
        start = max(0, end - window)  # a short last window reaches back for context
        yield Window(start=start, end=end, first=scored_until)
        if end == n:
            return
        scored_until = end - 1
        start = min(start + stride, scored_until)  # the window must hold what it scores


PAD_MULTIPLE = 64


def by_padded_width(windows: Sequence[Window], *, cap: int) -> list[tuple[int, list[int]]]:
    """Split a batch of windows into forwards of one width each: ``(width, indices)``, a
    window's length rounded up to PAD_MULTIPLE (at most ``cap``, the window size).

    A forward's floats depend on how far its rows are padded (attention sums over the
    padded length) but not on the other rows: so a window gets the same keys and scores
    whatever it is batched with, and batched requests equal `knnlm eval` to the bit."""
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        n = w.end - w.start
        groups.setdefault(min(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE, max(cap, n)), []).append(i)
    return list(groups.items())


def pack_windows(
    group: list[tuple[np.ndarray, Window]], *, pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 [b, width] input ids and attention mask for windows of token
    sequences; ``width`` defaults to the longest window."""
    width = width or max(w.end - w.start for _, w in group)
    input_ids = np.full((len(group), width), pad_id, dtype=np.int64)  # [b, W]
    mask = np.zeros((len(group), width), dtype=np.int64)  # 1 = real token
    for row, (seq, win) in enumerate(group):
        input_ids[row, : win.end - win.start] = seq[win.start : win.end]
        mask[row, : win.end - win.start] = 1
    return input_ids, mask


WindowJob = tuple[int, np.ndarray, Window]  # (text index, its tokens, one of its windows)


def window_batches(
    sequences: Sequence[np.ndarray],
    *,
    window: int,
    stride: int,
    batch_size: int,
    interleave: bool = False,
) -> list[list[WindowJob]]:
    """Every window of token ``sequences``, in batches of at most ``batch_size``: what one
    LM call takes. Each text's windows come in order; by default text after text, with
    ``interleave`` window j of every text before window j + 1 of any (more texts step
    together, as pointer following across batches wants).

    >>> seqs = [np.arange(6), np.arange(4)]
    >>> [[(i, w.start) for i, _, w in b] for b in window_batches(seqs, window=4, stride=2,
    ...                                                         batch_size=2)]
    [[(0, 0), (0, 2)], [(1, 0)]]
    >>> [[(i, w.start) for i, _, w in b] for b in window_batches(seqs, window=4, stride=2,
    ...                                                         batch_size=2, interleave=True)]
    [[(0, 0), (1, 0)], [(0, 2)]]
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    per_text = [
        [(i, seq, w) for w in sliding_windows(len(seq), window=window, stride=stride)]
        for i, seq in enumerate(sequences)
    ]
    if interleave:
        deepest = max((len(t) for t in per_text), default=0)
        jobs = [t[j] for j in range(deepest) for t in per_text if j < len(t)]
    else:
        jobs = [job for t in per_text for job in t]
    return [jobs[lo : lo + batch_size] for lo in range(0, len(jobs), batch_size)]
