"""How long work reports how far it got, without the library touching the terminal.

A ``Progress`` callback gets the stage's name, the units done so far and the total when it
is known (``None`` while it is not). Library code only calls it; the CLI draws bars from it,
the service ignores it.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int | None) -> None: ...


def no_progress(stage: str, done: int, total: int | None) -> None:
    """The default: report nothing."""
