"""Point ids that carry the stored token, so a search never fetches a payload.

A point id is a UUID of 128 bits: [64-bit document hash | 32-bit position | 32-bit token].
The document hash covers the domain and the text (not the file name), so ingesting the same
text again, from any path, writes the same ids and adds nothing. The token sits in the low
32 bits, where the search side reads it back from the id alone.

Why 128 bits and not a 64-bit integer id (which Qdrant Edge returns about 1 ms/query faster
at k=1024, since no ``uuid.UUID`` is built per hit): after the token's 16-18 bits, a 64-bit id
keeps ~47 bits of hash, and at the 1e8 points of a WikiText-103 datastore that means dozens
of colliding ids, each a point silently overwritten. 96 bits of (hash, position) make that
impossible in practice.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

import numpy as np

_MASK32 = (1 << 32) - 1


def document_hash(domain: str, text: str) -> int:
    """64-bit hash identifying one text in one domain."""
    h = hashlib.blake2b(digest_size=8)
    for part in (domain, text):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
        h.update(data)
    return int.from_bytes(h.digest(), "big")


def document_key(doc_hash: int) -> str:
    """The payload value that tags every point of a document (16 hex digits)."""
    return f"{doc_hash:016x}"


def make_point_ids(doc_hash: int, positions: np.ndarray, tokens: np.ndarray) -> list[str]:
    """UUID strings for points at ``positions`` (int [n]) whose values are ``tokens``."""
    if positions.shape != tokens.shape:
        raise ValueError("`positions` and `tokens` must have the same shape")
    if positions.size and (positions.min() < 0 or positions.max() > _MASK32):
        raise ValueError("positions must fit in 32 bits")
    if tokens.size and (tokens.min() < 0 or tokens.max() > _MASK32):
        raise ValueError("token ids must fit in 32 bits")
    low = (positions.astype(np.uint64) << np.uint64(32)) | tokens.astype(np.uint64)  # [n]
    prefix = f"{doc_hash:016x}"
    # UUID text is 8-4-4-4-12 hex digits; the low 64 bits are the last 4 + 12.
    return [
        f"{prefix[:8]}-{prefix[8:12]}-{prefix[12:]}-{s[:4]}-{s[4:]}"
        for s in np.char.zfill(np.char.mod("%x", low), 16).tolist()
    ]


def tokens_from_ids(ids: Sequence[object]) -> np.ndarray:
    """int64 tokens from point ids, as UUID objects or strings (the backends differ)."""
    if not ids:
        return np.zeros(0, dtype=np.int64)
    if isinstance(ids[0], uuid.UUID):
        return np.fromiter((u.int & _MASK32 for u in ids), dtype=np.int64, count=len(ids))
    return id_words(ids)[1].astype(np.int64) & _MASK32


def id_words(ids: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64 bits (uint64 [n] each) of UUID ids, as UUID objects or their
    text (as Qdrant writes it, with dashes, or without), decoded all at once."""
    n = len(ids)
    if n and isinstance(ids[0], str):
        try:  # one join and one hex decode for the whole batch: no object per id
            raw = bytes.fromhex("".join(ids).replace("-", ""))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raw = b""
        if len(raw) == 16 * n:
            words = np.frombuffer(raw, dtype=">u8").reshape(n, 2)  # [n, 2], big-endian
            return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)
    # UUID objects, a mix (a search's ids meet our own successor ids), or text of some
    # other length: one id at a time
    ints = [i.int if isinstance(i, uuid.UUID) else uuid.UUID(str(i)).int for i in ids]
    high = np.fromiter((i >> 64 for i in ints), dtype=np.uint64, count=n)
    low = np.fromiter((i & ((1 << 64) - 1) for i in ints), dtype=np.uint64, count=n)
    return high, low


# --- successors ------------------------------------------------------------------------------
# The successor of the point at (document, p) is the point at (document, p + 1). Its id holds
# its own value, the token at p + 2, which the point at p does not know from its id: every
# scheme that puts a token into the id needs one more token to name the next id, so the chain
# cannot close inside the id. We therefore keep the ids (and their collision bound: 96 bits of
# document hash and position, unchanged) and store that one token as the payload field
# ``next`` (``base.NEXT_FIELD``), read only for the points that pointer following follows.


def id_parts(ids: Sequence[object]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document hash (uint64), position (int64) and token (int64) of each point id [n]."""
    if not ids:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint64), empty, empty.copy()
    doc, low = id_words(ids)
    position = (low >> np.uint64(32)).astype(np.int64)
    token = (low & np.uint64(_MASK32)).astype(np.int64)
    return doc, position, token


def successor_ids(ids: Sequence[object], next_tokens: np.ndarray) -> list[str]:
    """The ids of the successors of points ``ids`` [n], whose successors' values are
    ``next_tokens`` (int [n], each >= 0): same document, position + 1."""
    doc, position, _ = id_parts(ids)
    tokens = np.asarray(next_tokens)
    if len(doc) != len(tokens):
        raise ValueError("`ids` and `next_tokens` must have the same length")
    if not len(doc):
        return []
    following = position + 1  # [n]
    if following.max() > _MASK32:  # the checks of make_point_ids
        raise ValueError("positions must fit in 32 bits")
    if tokens.min() < 0 or tokens.max() > _MASK32:
        raise ValueError("token ids must fit in 32 bits")
    low = (following.astype(np.uint64) << np.uint64(32)) | tokens.astype(np.uint64)  # [n]
    return _uuid_texts(doc, low)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# where the 32 hex digits go in the 36 characters of "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_DIGIT_COLUMNS = np.array([c for c in range(36) if c not in (8, 13, 18, 23)])


def _uuid_texts(high: np.ndarray, low: np.ndarray) -> list[str]:
    """UUID strings of the 128-bit ids ``high << 64 | low`` (uint64 [n] each), as
    ``str(uuid.UUID(int=...))`` writes them, built for all n at once."""
    n = len(high)
    words = np.stack([high, low], axis=1).astype(">u8")  # [n, 2], most significant byte first
    octets = words.view(np.uint8).reshape(n, 16)  # [n, 16]
    nibbles = np.stack([octets >> 4, octets & 15], axis=-1).reshape(n, 32)  # [n, 32]
    text = np.full((n, 36), ord("-"), dtype=np.uint8)  # [n, 36] ASCII
    text[:, _DIGIT_COLUMNS] = _HEX_DIGITS[nibbles]
    return text.view("S36").ravel().astype("U36").tolist()
