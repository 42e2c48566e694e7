"""Generated tokens as text, as they come: stop strings matched in the text (across token
boundaries), the text that is safe to stream, and where each token starts in it.

Pure and thread-agnostic: the model's worker thread feeds a ``ChoiceText`` one step at a
time (its ``add`` decides whether the row goes on), and the handler reads the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Decode = Callable[[Sequence[int]], str]  # token ids -> text, special tokens skipped
REPLACEMENT = "\ufffd"  # what a decoder shows for a character cut between two tokens
WINDOW = 6  # tokens of context when decoding one token's share of the text


@dataclass(frozen=True)
class TokenEntry:
    """One token's log-probability record."""

    token: str  # the token alone, as text (special tokens by name)
    logprob: float | None  # None where nothing predicts it or its probability is 0
    top: tuple[tuple[str, float], ...] | None  # likeliest tokens there; None: not computed
    offset: int  # where the token starts in its text


def finite(x: float) -> float | None:
    """JSON has no infinities: ``None`` stands for a log-probability of -inf."""
    return x if math.isfinite(x) else None


def token_offsets(decode: Decode, ids: Sequence[int]) -> list[int]:
    """Where each token's text starts in ``decode(ids)``, in O(len(ids)) decodes.

    Each token's share is the text it adds to the few tokens before it (decoders that drop
    a leading space at the start of a sequence agree with themselves on the same start);
    a character split over two tokens counts for the token that completes it.

    >>> token_offsets(lambda ids: "".join(chr(i) for i in ids), [97, 98, 99])
    [0, 1, 2]
    """
    offsets: list[int] = []
    total = 0
    for i in range(len(ids)):
        offsets.append(total)
        start = max(0, i - WINDOW)
        before = decode(ids[start:i]).rstrip(REPLACEMENT)
        after = decode(ids[start : i + 1]).rstrip(REPLACEMENT)
        if after.startswith(before):
            total += len(after) - len(before)
    return offsets


class ChoiceText:
    """One choice's tokens and text, cut before the first stop string generated.

    ``add`` takes each new token (its text, ln p and top tokens) and answers False once a
    stop string appears in the text: the row ends there and ``text`` excludes the stop
    string. With ``min_tokens``, as vLLM's, only a stop string that ends in the text of
    token ``min_tokens`` or a later one counts. ``sendable`` is the text that may be
    streamed now: without a character still cut between tokens and without an ending that
    could become a stop string.

    >>> decode = lambda ids: "".join(chr(i) for i in ids)
    >>> choice = ChoiceText(decode, decode_one=lambda i: chr(i), stops=("cd",))
    >>> [choice.add(ord(c), -1.0) for c in "abc"], choice.sendable()
    ([True, True, True], 'ab')
    >>> choice.add(ord("d"), -1.0), choice.text, choice.stop_reason
    (False, 'ab', 'cd')
    >>> [e.token for e in choice.kept_entries()]
    ['a', 'b']
    """

    def __init__(
        self,
        decode: Decode,
        *,
        decode_one: Callable[[int], str],
        stops: Sequence[str],
        min_tokens: int = 0,
    ):
        self._decode = decode
        self._decode_one = decode_one
        self.stops = tuple(stops)
        self.min_tokens = min_tokens  # a stop string counts only where it ends after these
        self._free_from = 0  # where the text of the first min_tokens - 1 tokens ends
        self.tokens: list[int] = []
        self.entries: list[TokenEntry] = []
        self.raw = ""  # all tokens decoded
        self.cut: int | None = None  # where the first stop string starts in ``raw``
        self.stop_reason: str | None = None
        self._offset = 0  # text so far, by the tokens' shares

    def add(
        self, token: int, log_prob: float, top: Sequence[tuple[int, float]] | None = None
    ) -> bool:
        """Take one generated token; False once a stop string ended the text."""
        self.tokens.append(token)
        start = max(0, len(self.tokens) - 1 - WINDOW)
        before = self._decode(self.tokens[start:-1]).rstrip(REPLACEMENT)
        after = self._decode(self.tokens[start:]).rstrip(REPLACEMENT)
        shown = None
        if top is not None:
            shown = tuple((self._decode_one(t), lp) for t, lp in top if math.isfinite(lp))
        entry = TokenEntry(self._decode_one(token), finite(log_prob), shown, self._offset)
        self.entries.append(entry)
        if after.startswith(before):
            self._offset += len(after) - len(before)
        self.raw = self._decode(self.tokens)
        if len(self.tokens) < self.min_tokens:  # too soon for a stop string to end the text
            self._free_from = len(self.raw)
            return True
        if self.stop_reason is None and self.stops:
            found = [
                (at, s)
                for s in self.stops
                if (at := self.raw.find(s, max(0, self._free_from - len(s) + 1))) >= 0
            ]
            if found:
                self.cut, self.stop_reason = min(found, key=lambda f: f[0])
                return False
        return self.stop_reason is None

    @property
    def text(self) -> str:
        """The text, without the stop string and what follows it."""
        return self.raw if self.cut is None else self.raw[: self.cut]

    def sendable(self) -> str:
        """The text that no later token can change: a stream may send it now."""
        if self.cut is not None:
            return self.raw[: self.cut]
        text = self.raw.rstrip(REPLACEMENT)
        held = 0  # the longest ending that begins a stop string
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if stop.startswith(text[-size:]):
                    held = size
                    break
        return text[: len(text) - held]

    def kept_entries(self) -> list[TokenEntry]:
        """The tokens that show in ``text``: after a stop string, those that start before
        it; otherwise all of them (an end-of-text token included)."""
        if self.cut is None:
            return list(self.entries)
        return [e for e in self.entries if e.offset < self.cut]

    def ready(self, chars: int) -> int:
        """How many entries start within the first ``chars`` characters."""
        return sum(1 for e in self.entries[: len(self.entries)] if e.offset < chars)
