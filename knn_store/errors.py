"""Exceptions raised by knnlm. Every message says what went wrong and what to do next.

    KnnlmError
     ├── ConfigError            bad settings, flags or model choice
     ├── StoreError             anything between us and Qdrant
     │    ├── StoreUnavailable      server unreachable, path locked
     │    ├── CollectionMissing     no such collection yet
     │    └── DimensionMismatch     collection built by another model or key type
     └── CorpusError            unreadable, binary or empty input text

The CLI turns any ``KnnlmError`` into one line on stderr and exit code 1.
"""

from __future__ import annotations


class KnnlmError(Exception):
    """Base class of every error that knnlm reports to users."""


class ConfigError(KnnlmError):
    """A setting, flag or model choice is invalid."""


class StoreError(KnnlmError):
    """A datastore operation failed."""


class StoreUnavailable(StoreError):
    """The Qdrant server or the embedded store cannot be reached or opened."""


class CollectionMissing(StoreError):
    """The collection does not exist yet."""


class DimensionMismatch(StoreError):
    """The collection was built for another model, key type or dimension."""


class CorpusError(KnnlmError):
    """The input text cannot be read or yields no tokens."""
