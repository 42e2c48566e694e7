"""Progress bars on stderr for the library's ``Progress`` callbacks."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

# each stage's unit (tokens unless named); bytes count in powers of 1024
_UNITS = {
    "read": "doc",
    "check": "pt",
    "copy": "pt",
    "hash": "B",
    "write": "B",
    "unpack": "B",
    "download": "B",
}


class Bars:
    """A ``Progress`` callback that draws one tqdm bar per stage; use it as a context
    manager so the bars close. ``quiet`` draws nothing."""

    def __init__(self, *, quiet: bool = False, transient: tuple[str, ...] = ("read",)) -> None:
        self.quiet = quiet
        self.transient = transient
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        bar = self._bars.get(stage)
        if bar is None:
            for other in list(self._bars):  # a new stage ends the ones before it
                self._bars.pop(other).close()
            unit = _UNITS.get(stage, "tok")
            bar = tqdm(
                total=total,
                desc=stage,
                unit=unit,
                unit_scale=True,
                unit_divisor=1024 if unit == "B" else 1000,
                leave=stage not in self.transient,
            )
            self._bars[stage] = bar
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
