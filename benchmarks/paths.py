"""Results name files relative to the repository: no machine's absolute paths in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def relative(value: Any) -> Any:
    """``value`` (JSON-like) with this checkout's absolute paths made relative to it, and
    other absolute paths cut to their last part (another checkout, a temporary folder).

    >>> relative({"work": str(ROOT / "build" / "x"), "code": "/tmp/knnlm-before"})
    {'work': 'build/x', 'code': 'knnlm-before'}
    """
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v) for v in value]
    if isinstance(value, str):
        if value == str(ROOT):
            return "."
        value = value.replace(str(ROOT) + "/", "")
        if value.startswith("/") and " " not in value:
            return Path(value).name
        return value.replace(str(Path.home()), "~")
    return value
