"""The JSON access log of ``knnlm serve --access-log json``: one JSON object per request.

The request observer (``metrics.Observer``) hands every finished request to ``log_request``,
which writes to the ``knnlm.access`` logger only when someone listens: the CLI attaches a
JSON handler within ``json_access_log``; without it the call costs one level check. A line
holds the time, method, route template, status, duration, bytes sent, request id and the
client's address, and nothing else: no headers (the API key travels in one), no query
string, no body.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import IO, Any

LOGGER_NAME = "knnlm.access"
_log = logging.getLogger(LOGGER_NAME)
_FIELD = "knnlm_access"  # the LogRecord attribute that carries the entry


def log_request(entry: dict[str, Any]) -> None:
    """Log one finished request; ``entry`` holds only the fields named in the module doc."""
    if not _log.isEnabledFor(logging.INFO):
        return
    # the plain-text message, for a handler that is not ours (a root logger at INFO)
    _log.info(
        "%s %s %s %.1f ms",
        entry["method"],
        entry["route"],
        entry["status"],
        entry["duration_ms"],
        extra={_FIELD: entry},
    )


class JsonLines(logging.Formatter):
    """A record as one JSON line: ``time`` (UTC, ISO 8601 with milliseconds), then the
    access entry's fields; records that carry none keep their message as ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        millis = int((record.created - seconds) * 1000)
        entry = getattr(record, _FIELD, None)
        body = entry if isinstance(entry, dict) else {"message": record.getMessage()}
        return json.dumps({"time": f"{stamp}.{millis:03d}Z", **body}, ensure_ascii=False)


@contextlib.contextmanager
def json_access_log(stream: IO[str]) -> Iterator[logging.Handler]:
    """Within the block, write the access log to ``stream`` as JSON lines, and only there
    (not to the root logger's handlers); after it, the logger is as it was."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    level, propagate = _log.level, _log.propagate
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False
    try:
        yield handler
    finally:
        _log.removeHandler(handler)
        _log.setLevel(level)
        _log.propagate = propagate
