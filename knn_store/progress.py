"""How long work reports how far it got, without the library touching the terminal.

A ``Progress`` callback gets the stage's name, the units done so far and the total when it
is known (``None`` while it is not). Every long piece of work in the library (ingest, eval,
tune, check, copies, snapshots) takes one as ``on_progress``; ``Counter`` turns batch sizes
into running totals. Library code only calls it; the CLI draws bars from it (the stage's
name says its unit), the service ignores it.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int | None) -> None: ...


def no_progress(stage: str, done: int, total: int | None) -> None:
    """The default: report nothing."""


class Counter:
    """A stage's running total for a ``Progress``, from increments: where work comes in
    batches, chunks or files, ``add(n)`` after each one reports the sum so far.

    >>> seen = []
    >>> count = Counter(lambda *a: seen.append(a), "copy", total=5)
    >>> count.add(2); count.add(3); seen
    [('copy', 0, 5), ('copy', 2, 5), ('copy', 5, 5)]
    """

    def __init__(self, on_progress: Progress, stage: str, total: int | None = None) -> None:
        self.on_progress = on_progress
        self.stage = stage
        self.total = total
        self.done = 0
        on_progress(stage, 0, total)

    def add(self, n: int) -> None:
        self.done += n
        self.on_progress(self.stage, self.done, self.total)
