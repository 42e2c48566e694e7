"""Records kept beside the points (what built a collection, its tuned policy) carry a
checksum of their content, so a record edited by hand or damaged is refused instead of
silently changing what eval computes.

>>> sealed = seal({"temperature": 2.0, "k": 8})
>>> unseal(sealed, what="policy") == {"temperature": 2.0, "k": 8}
True
>>> unseal({**sealed, "k": 9}, what="policy")
Traceback (most recent call last):
...
knn_store.errors.StoreDamaged: the policy was edited by hand or damaged: ...
>>> unseal({"temperature": 2.0, "k": 8}, what="policy")
Traceback (most recent call last):
...
knn_store.errors.StoreDamaged: the policy has no checksum: ...

A record without a checksum is refused like a damaged one: removing the checksum must not
be a way around it. Records that knnlm wrote before checksums existed are sealed once, on
purpose, by ``knnlm check --seal-records`` (``accepting_unsealed``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from knn_store.errors import StoreDamaged

CHECKSUM_FIELD = "checksum"
# Within ``accepting_unsealed``: the names of the records read without a checksum.
_UNSEALED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "knnlm_unsealed", default=None
)


@contextlib.contextmanager
def accepting_unsealed() -> Iterator[list[str]]:
    """Read records without a checksum as they are (records written before checksums
    existed), listing what was read so; only for sealing them once (``knnlm check
    --seal-records``), never for answering from them."""
    found: list[str] = []
    token = _UNSEALED.set(found)
    try:
        yield found
    finally:
        _UNSEALED.reset(token)


def sealing() -> bool:
    """Whether records without a checksum are being accepted to seal them
    (``accepting_unsealed``)."""
    return _UNSEALED.get() is not None


ROUNDED = "b2r:"  # floats to 7 significant digits (b2: exact, as written before)


def _digest(body: dict[str, Any], *, rounded: bool = True) -> str:
    """A Qdrant server keeps collection metadata through a JSON parser that may move a
    float's last bit (1.18.3 does: tuned bucket edges came back 1 ulp off), so the checksum
    covers floats to 7 significant digits; an exact one (``b2:``) still checks."""
    if rounded:
        body = _rounded(body)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return (ROUNDED if rounded else "b2:") + digest


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the checksum of its other fields."""
    body = {k: v for k, v in record.items() if k != CHECKSUM_FIELD}
    return {**body, CHECKSUM_FIELD: _digest(body)}


def unseal(record: Any, *, what: str) -> dict[str, Any]:
    """The record without its checksum, after checking it; ``StoreDamaged`` if it does not
    match, or if it has none (see ``accepting_unsealed`` for records older than checksums)."""
    if not isinstance(record, dict):
        raise StoreDamaged(f"the {what} is not a JSON object: {str(record)[:80]}")
    if CHECKSUM_FIELD not in record:
        unsealed = _UNSEALED.get()
        if unsealed is None:
            raise StoreDamaged(
                f"the {what} has no checksum: it was damaged or edited by hand, or written "
                "by a knnlm older than checksums; `knnlm check --seal-records` seals a record "
                "you know to be right, once"
            )
        unsealed.append(what)
        return record
    body = {k: v for k, v in record.items() if k != CHECKSUM_FIELD}
    checksum = record[CHECKSUM_FIELD]
    rounded = isinstance(checksum, str) and checksum.startswith(ROUNDED)
    if checksum != _digest(body, rounded=rounded):
        raise StoreDamaged(
            f"the {what} was edited by hand or damaged: its checksum does not match its "
            "content; run `knnlm check`"
        )
    return body
