"""Server-sent events of the OpenAI routes: each kind of stream's chunks (completions,
chat), and the loop that sends a request's rows as their text becomes safe to send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from knn_store.errors import KnnlmError
from knnlm.service.batcher import Batcher
from knnlm.service.detokenize import TokenEntry
from knnlm.service.errors import error_body, knnlm_error_status
from knnlm.service.openai_choices import (
    Row,
    Scores,
    abandon,
    chat_logprobs,
    completion_logprobs,
    shifted,
    usage_of,
)

if TYPE_CHECKING:
    from knnlm.service.openai_serving import OpenAIServing


class Events:
    """What the chunks of one kind of stream look like."""

    def __init__(self, serving: OpenAIServing, head: dict[str, Any], rows: list[Row]) -> None:
        self.serving = serving
        self.head = head
        self.rows = rows

    def opening(self, row: Row) -> dict[str, Any] | None:
        return None

    def delta(self, row: Row, text: str, entries: list[TokenEntry]) -> dict[str, Any]:
        raise NotImplementedError

    def closing(self, row: Row, text: str, entries: list[TokenEntry]) -> dict[str, Any]:
        raise NotImplementedError

    def _envelope(
        self, row: Row, content: dict[str, Any], logprobs: Any, finish: str | None
    ) -> dict[str, Any]:
        """One chunk of ``row``: its ``content`` (text, or a chat delta), log-probabilities
        and, in its last chunk, why it finished."""
        choice = {
            "index": row.index,
            **content,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": row.text.stop_reason if finish else None,
        }
        return {**self.head, "object": self.object, "choices": [choice]}

    def usage(self) -> dict[str, Any]:
        return {
            **self.head,
            "object": self.object,
            "choices": [],
            "usage": usage_of(self.rows).model_dump(),
        }

    object = ""


class CompletionEvents(Events):
    object = "text_completion"

    def __init__(
        self,
        serving: OpenAIServing,
        head: dict[str, Any],
        rows: list[Row],
        *,
        echo: bool,
        want: bool,
        scores: Scores | None,
    ) -> None:
        super().__init__(serving, head, rows)
        self.echo = echo
        self.want = want
        self.scores = scores

    def _chunk(
        self, row: Row, text: str, entries: list[TokenEntry], finish: str | None = None
    ) -> dict[str, Any]:
        logprobs = None
        if self.want:
            logprobs = completion_logprobs(entries).model_dump()
        return self._envelope(row, {"text": text}, logprobs, finish)

    def _shift(self, row: Row, entries: list[TokenEntry]) -> list[TokenEntry]:
        by = len(row.prompt.text) if self.echo else 0
        return [shifted(e, by) for e in entries]

    def opening(self, row: Row) -> dict[str, Any] | None:
        if not self.echo:
            return None
        entries = self.serving.prompt_entries(row, self.scores) if self.want else []
        return self._chunk(row, row.prompt.text, entries)

    def delta(self, row: Row, text: str, entries: list[TokenEntry]) -> dict[str, Any]:
        return self._chunk(row, text, self._shift(row, entries))

    def closing(self, row: Row, text: str, entries: list[TokenEntry]) -> dict[str, Any]:
        finish = self.serving.finish_reason(row)
        return self._chunk(row, text, self._shift(row, entries), finish)


class ChatEvents(Events):
    object = "chat.completion.chunk"

    def __init__(
        self, serving: OpenAIServing, head: dict[str, Any], rows: list[Row], *, want: bool
    ) -> None:
        super().__init__(serving, head, rows)
        self.want = want

    def _chunk(
        self,
        row: Row,
        delta: dict[str, Any],
        entries: list[TokenEntry] | None,
        finish: str | None = None,
    ) -> dict[str, Any]:
        logprobs = None
        if self.want and entries is not None:
            logprobs = chat_logprobs(entries).model_dump()
        return self._envelope(row, {"delta": delta}, logprobs, finish)

    def opening(self, row: Row) -> dict[str, Any] | None:
        return self._chunk(row, {"role": "assistant", "content": ""}, None)

    def delta(self, row: Row, text: str, entries: list[TokenEntry]) -> dict[str, Any]:
        return self._chunk(row, {"content": text}, entries)

    def closing(self, row: Row, text: str, entries: list[TokenEntry]) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return self._chunk(row, delta, entries, self.serving.finish_reason(row))


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def sse(
    rows: list[Row], events: Events, *, usage: bool, batcher: Batcher
) -> AsyncIterator[str]:
    """Server-sent events: each row's opening chunk, then its text deltas as they become
    safe to send (with the records of the tokens in them), its closing chunk with the
    finish reason, the usage when asked, and ``[DONE]``. A row's deltas add up to its
    non-streamed text; rows interleave, told apart by ``index``. A row that fails (a
    deadline, the shutdown) ends the stream with an error event, then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # on the model's worker thread, or where a future settles
        if not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    for row in rows:
        if row.on_step is not None:
            row.on_step.listener = notify
        row.future.add_done_callback(lambda _: notify())
    sent = {row.index: "" for row in rows}  # generated text sent
    sent_entries = {row.index: 0 for row in rows}
    done: set[int] = set()
    try:
        for row in rows:
            opening = events.opening(row)
            if opening is not None:
                yield _event(opening)
        while len(done) < len(rows):
            wake.clear()
            for row in rows:
                if row.index in done:
                    continue
                i = row.index
                if row.future.done():
                    failure = _failure(row.future)
                    if failure is not None:  # the error, then the end, as vLLM ends it
                        yield _event(failure)
                        yield "data: [DONE]\n\n"
                        return
                    text = row.text.text
                    rest = text[len(sent[i]) :] if text.startswith(sent[i]) else ""
                    entries = row.text.kept_entries()[sent_entries[i] :]
                    yield _event(events.closing(row, rest, entries))
                    done.add(i)
                    continue
                if row.on_step is None:
                    continue
                text, ready = row.on_step.snapshot
                if len(text) > len(sent[i]) and text.startswith(sent[i]):
                    entries = row.text.entries[sent_entries[i] : ready]
                    yield _event(events.delta(row, text[len(sent[i]) :], entries))
                    sent[i], sent_entries[i] = text, max(ready, sent_entries[i])
            if len(done) < len(rows):
                await wake.wait()
        if usage:
            yield _event(events.usage())
        yield "data: [DONE]\n\n"
    finally:
        abandon(rows, batcher)  # a client gone mid-stream: its rows end at their next token


def _failure(future: Future[list[int]]) -> dict[str, Any] | None:
    """The error event of a row that failed, or None."""
    if future.cancelled():
        return error_body(503, "the request was cancelled")
    error = future.exception()
    if error is None:
        return None
    if isinstance(error, KnnlmError):
        return error_body(knnlm_error_status(error), str(error))
    return error_body(500, "internal error; the server log has the details")
