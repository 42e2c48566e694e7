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
     └── CorpusError            unreadable, binary or empty input text

The CLI turns any ``KnnlmError`` into one line on stderr and exit code 1.
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
