"""Exceptions raised by knnlm. Every message says what went wrong and what to do next.

    KnnlmError
     ├── ConfigError            bad settings, flags or model choice
     │    └── UnknownDomain         a domain the collection does not hold
     ├── StoreError             anything between us and Qdrant
     │    ├── StoreUnavailable      server unreachable (transient: a rerun may succeed)
     │    │    └── StoreLocked          the embedded store is held by another process
     │    ├── StoreDamaged          files missing, unreadable or inconsistent
     │    ├── CollectionMissing     no such collection yet
     │    └── DimensionMismatch     collection built by another model, key type or settings
     ├── CorpusError            unreadable, binary or empty input text
     ├── ServiceUnavailable     the service cannot take the request now (503)
     │    ├── ShuttingDown          it is shutting down (and closes the connection)
     │    └── QueueFull             too many requests wait (429, with Retry-After)
     ├── DeadlineExceeded       the request outlasted the service's deadline (504)
     └── RequestCancelled       its client left before the answer (499)

The CLI turns any ``KnnlmError`` into one line on stderr and exit code 1; the service
answers each with the HTTP status its class carries (``status``), else 400 or 503.
"""

from __future__ import annotations


class KnnlmError(Exception):
    """Base class of every error that knnlm reports to users."""


class ConfigError(KnnlmError):
    """A setting, flag or model choice is invalid."""


class UnknownDomain(ConfigError):
    """A domain was named that the collection does not hold."""


class StoreError(KnnlmError):
    """A datastore operation failed."""


class StoreUnavailable(StoreError):
    """The Qdrant server cannot be reached, or the embedded store cannot be opened."""


class StoreAccessDenied(StoreError):
    """The server refused the API key, or the key may not do this (read-only)."""


class StoreLocked(StoreUnavailable):
    """Another process holds the embedded store."""


class StoreDamaged(StoreError):
    """The collection's files are missing, unreadable or inconsistent."""


class CollectionMissing(StoreError):
    """The collection does not exist yet."""


class DimensionMismatch(StoreError):
    """The collection was built for another model, key type, dimension or storage setting."""


class CorpusError(KnnlmError):
    """The input text cannot be read or yields no tokens."""


class ServiceUnavailable(KnnlmError):
    """The service is shutting down, or its worker stopped: retry later, maybe elsewhere."""


class ShuttingDown(ServiceUnavailable):
    """The service is shutting down: the answer closes its connection, so that a client on
    a kept-alive connection goes to another replica rather than back to this one."""

    close_connection = True


class QueueFull(ServiceUnavailable):
    """Too many requests are waiting; ``retry_after`` seconds is a guess of when there will
    be room."""

    status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(KnnlmError):
    """A request took longer than the service's per-request deadline; it no longer runs."""

    status = 504


class RequestCancelled(KnnlmError):
    """The request was cancelled (its client left): nobody waits for its answer."""

    status = 499  # nginx's "client closed request"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none): what a
    one-line refusal quotes of an engine's or a library's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
