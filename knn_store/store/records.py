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
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from knn_store.errors import StoreDamaged

CHECKSUM_FIELD = "checksum"


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
    match. Records written before checksums existed have none and are taken as they are."""
    if not isinstance(record, dict):
        raise StoreDamaged(f"the {what} is not a JSON object: {str(record)[:80]}")
    if CHECKSUM_FIELD not in record:
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
