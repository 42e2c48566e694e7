"""The choices of an OpenAI request as they are generated: a prompt's rows, the callback
that feeds each row's text on the model's worker thread, and their OpenAI shapes (usage,
log-probabilities). Shared by the handlers (``openai_serving``) and the streams
(``openai_stream``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from knn_store.results import TokenScores
from knnlm.service.batcher import Batcher
from knnlm.service.detokenize import ChoiceText, TokenEntry
from knnlm.service.openai_protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:
    from knn_store.generation import Step


@dataclass(frozen=True)
class Prompt:
    ids: np.ndarray  # int64 [n], BOS first
    text: str  # as echo shows it
    max_new: int  # tokens to add at most; 0: none (echo only)


@dataclass(frozen=True)
class Scores:
    """The echoed prompts' scores, one per prompt (None: nothing to predict)."""

    per_prompt: list[TokenScores | None]
    n: int  # choices per prompt
    knn: bool  # the kNN-LM's numbers, or the LM's

    def of(self, row: Row) -> TokenScores | None:
        return self.per_prompt[row.index // self.n]


@dataclass
class Row:
    """One choice being generated."""

    index: int
    prompt: Prompt
    text: ChoiceText
    future: Future[list[int]]
    on_step: OnStep | None  # None: nothing to generate (echo with max_tokens 0)
    ignore_eos: bool = False  # an end-of-text token did not end it


class OnStep:
    """The batcher's callback for one row, on the model's worker thread: feeds the row's
    text, tells a stream, and ends the row at a stop string or once the client is gone."""

    def __init__(self, text: ChoiceText, *, want_top: bool) -> None:
        self.text = text
        self.want_top = want_top
        self.listener: Callable[[], None] | None = None
        self.gone = False
        # (text a stream may send, entries within it): replaced whole, so that the event
        # loop's thread never reads a half-updated ChoiceText
        self.snapshot: tuple[str, int] = ("", 0)

    def __call__(self, step: Step) -> bool:
        go_on = self.text.add(step.token, step.log_prob, step.top if self.want_top else None)
        sendable = self.text.sendable()
        self.snapshot = (sendable, self.text.ready(len(sendable)))
        if self.listener is not None:
            self.listener()
        return go_on and not self.gone


def abandon(rows: Sequence[Row], batcher: Batcher) -> None:
    """End rows nobody waits for: a queued one never runs, a running one ends at its next
    step (done ones are left as they are)."""
    for row in rows:
        batcher.cancel(row.future)
        if row.on_step is not None:
            row.on_step.gone = True


def shifted(entry: TokenEntry, by: int) -> TokenEntry:
    return TokenEntry(entry.token, entry.logprob, entry.top, entry.offset + by)


def usage_of(rows: Sequence[Row]) -> Usage:
    """Each prompt counts once, whatever its n; every choice's tokens count."""
    prompts = {id(row.prompt): row.prompt for row in rows}
    prompt_tokens = sum(len(p.ids) for p in prompts.values())
    completion = sum(len(row.text.tokens) for row in rows)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def completion_logprobs(entries: Sequence[TokenEntry]) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.top is None else dict(e.top) for e in entries],
        text_offset=[e.offset for e in entries],
    )


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenEntry]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=-9999.0 if e.logprob is None else e.logprob,  # OpenAI's "unlikely"
                bytes=_bytes(e.token),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=_bytes(t)) for t, lp in e.top or ()
                ],
            )
            for e in entries
        ]
    )
