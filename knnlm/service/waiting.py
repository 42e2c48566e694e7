"""Waiting on the batcher for a client that may leave, and the size of an explain answer.

A handler that awaited a job's future alone would keep the model busy for a client that is
gone, or past any deadline. ``result_or_cancel`` races the future against the client's
disconnect and the job's deadline, and cancels the job when it loses, so its row leaves
its batch. The batcher's errors carry their HTTP status (``QueueFull`` 429 with
``retry_after``, ``DeadlineExceeded`` 504), which ``errors`` answers. ``check_explain``
bounds what one ``/v1/explain`` answer may hold.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any, TypeVar

from fastapi import Request

from knn_store.errors import RequestCancelled
from knnlm.service.batcher import Batcher
from knnlm.service.errors import ApiError

T = TypeVar("T")


async def result_or_cancel(request: Request, future: Future[T], batcher: Batcher) -> T:
    """The job's result, or its error; the job is cancelled if the client disconnects
    first (``RequestCancelled`` is raised), or if its deadline passes first
    (``DeadlineExceeded``), or if this handler itself is cancelled (a server's shutdown).

    Call it once the request body has been read (FastAPI has, for a body parameter):
    it listens to ``request.receive``, where only the disconnect remains to come.
    """
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {answer, gone},
            timeout=batcher.time_left(future),
            return_when=asyncio.FIRST_COMPLETED,
        )
    except asyncio.CancelledError:
        batcher.cancel(future)
        answer.add_done_callback(_read_out)
        raise
    finally:
        gone.cancel()
    if answer in done:
        return answer.result()
    if gone in done:
        batcher.cancel(future)
        answer.add_done_callback(_read_out)  # its error is the cancel's: nobody waits for it
        raise RequestCancelled("the client disconnected before its answer")
    batcher.cancel(future, batcher.deadline_error())
    return await answer  # the deadline's error (or the result, had it just come)


def _read_out(answer: asyncio.Future[Any]) -> None:
    """Mark the error of an answer nobody awaits as seen (asyncio would log it at exit)."""
    if not answer.cancelled():
        answer.exception()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects; the body must have been read before."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def explain_cells(tokens: int, *, top: int, neighbours: int) -> int:
    """The entries an explain answer holds: per predicted token, ``neighbours`` neighbours
    (a few hundred bytes of JSON each, with their text) and ``top`` predictions of each of
    the two distributions, counted as ``top`` entries (they are small).

    >>> explain_cells(250, top=3, neighbours=1024)
    256750
    """
    return tokens * (neighbours + top)


def check_explain(tokens: int, *, top: int, neighbours: int, k: int, max_cells: int) -> None:
    """Refuse, by name, an explain that shows more neighbours than the server retrieves
    (``k``, its ``--top-k``: 400) or whose answer passes ``max_cells`` entries (413)."""
    if neighbours > k:
        raise ApiError(
            400,
            f"neighbours: at most {k}, the neighbours this server retrieves per token "
            "(its --top-k)",
            param="neighbours",
        )
    cells = explain_cells(tokens, top=top, neighbours=neighbours)
    if cells > max_cells:
        raise ApiError(
            413,
            f"explain: {tokens:,} tokens x ({neighbours} neighbours + {top} top) = {cells:,} "
            f"entries, more than this server answers ({max_cells:,}, --max-explain-cells); "
            "send a shorter text or ask for fewer neighbours",
            param="neighbours",
        )
