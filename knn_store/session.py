"""A ready kNN-LM from settings: the composition root of the library.

``open_session`` opens the collection, loads the model that built it, checks the two belong
together, validates the search domains, and applies the collection's tuned policy and gate
(or the flags that override them). The CLI, the HTTP service and library users all start
here::

    from knn_store import KnnlmSettings, open_session

    with open_session(KnnlmSettings(collection="kernel-docs")) as session:
        result = session.evaluate(["Some held-out text."])
        print(result.base_perplexity, result.knn_perplexity)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from knn_store.errors import ConfigError, StoreDamaged, UnknownDomain
from knn_store.progress import Progress, no_progress
from knn_store.saved_policy import Resolved, SavedPolicy, resolve_policy
from knn_store.settings import KnnlmSettings
from knn_store.store import KnnStore, open_store
from knn_store.store.base import INDEXED_FIELDS, CollectionMeta

if TYPE_CHECKING:
    import numpy as np

    from knn_store.doc_cache import DocumentCache
    from knn_store.knn_lm import KnnLM
    from knn_store.lm import LanguageModel
    from knn_store.results import EvalResult


@dataclass
class Session:
    """An opened collection with its LM and kNN-LM, ready to query. Close it when done."""

    settings: KnnlmSettings
    store: KnnStore
    lm: LanguageModel
    knn_lm: KnnLM
    resolved: Resolved
    saved: SavedPolicy | None

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, BOS first, as every scoring path expects them."""
        return [self.lm.encode(t) for t in texts]

    def evaluate(self, texts: Sequence[str], *, on_progress: Progress = no_progress) -> EvalResult:
        """Perplexity of the LM alone and of the kNN-LM over ``texts``."""
        return self.knn_lm.evaluate(self.encode(texts), on_progress=on_progress)

    def with_overrides(
        self,
        *,
        lmbda: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
    ) -> KnnLM:
        """This session's kNN-LM with some flags given again (a request's own), resolved as
        ``open_session`` resolves the same flags (``resolve_knn``): an explicit lambda is a
        fixed lambda without the gate and the tuned levers; T alone keeps the tuned policy,
        its gate and its levers. No override: the session's own."""
        given = {"lmbda": lmbda, "temperature": temperature, "top_k": top_k}
        updates = {name: value for name, value in given.items() if value is not None}
        if not updates:
            return self.knn_lm
        meta = self.store.meta
        assert meta is not None  # an open session has its collection's record
        _, options = resolve_knn(self.settings.model_copy(update=updates), self.saved, meta)
        return self.knn_lm.with_options(**options)

    def describe(self) -> str:
        """One line: which policy, T, gate, and where they came from."""
        r = self.resolved
        gate = f", gate {r.gate.threshold:.3g}" if r.gate is not None else ""
        return f"policy {r.policy!r} T={r.temperature:g}{gate} ({r.source})"

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_session(
    settings: KnnlmSettings,
    *,
    search_domains: Sequence[str] = (),
    lm: LanguageModel | None = None,
) -> Session:
    """Open ``settings.collection`` and everything needed to score and generate with it.

    Args:
        settings: every knob; with no ``key_type`` given, the collection's own is used.
        search_domains: retrieve from these domains only (each must exist).
        lm: an already loaded model to reuse (it must be the one that built the store).
    """
    from knn_store.knn_lm import KnnLM
    from knn_store.lm import load_language_model

    store = open_store(settings, create=False)
    try:
        meta = store.meta
        assert meta is not None  # open_store(create=False) refuses a missing collection
        store.require_sound()
        missing = set(INDEXED_FIELDS) - store.indexed_fields()
        if missing:  # they go only with lost segments: what eval would read is incomplete
            raise StoreDamaged(
                f"collection {store.name!r} lost its payload index on "
                f"{', '.join(sorted(missing))}; it is damaged: run `knnlm check`"
            )
        if "key_type" not in settings.model_fields_set:  # the collection's own key type
            settings = settings.model_copy(update={"key_type": meta.key_type})
        if lm is None:
            lm = load_language_model(settings)
        meta.check_compatible(
            lm.collection_meta(scheme=meta.fingerprint_scheme), collection=store.name
        )
        window, stride = windows_for(settings, lm)
        domains = check_domains(store, search_domains)
        raw = store.load_policy()
        saved = None if raw is None else SavedPolicy.from_dict(raw, collection=store.name)
        resolved, options = resolve_knn(settings, saved, meta)
        if resolved.source.startswith("tuned") and saved is not None:
            if saved.k != settings.top_k:
                warnings.warn(
                    f"the tuned policy was fitted with --top-k {saved.k}, not {settings.top_k}",
                    stacklevel=2,
                )
            if set(saved.domains) != set(domains):
                tuned_on = ", ".join(saved.domains) or "every domain"
                warnings.warn(
                    f"the tuned policy was fitted retrieving from {tuned_on}", stacklevel=2
                )
        knn_lm = KnnLM(
            lm,
            store,
            **options,
            search=settings.search_options(),
            domains=domains,
            window=window,
            stride=stride,
            batch_size=settings.batch_size,
            search_batch=settings.search_batch,
        )
    except BaseException:
        store.close()
        raise
    return Session(settings, store, lm, knn_lm, resolved, saved)


def resolve_knn(
    settings: KnnlmSettings, saved: SavedPolicy | None, meta: CollectionMeta
) -> tuple[Resolved, dict[str, Any]]:
    """Every ``KnnLM`` argument that the settings, the collection's saved policy and its
    record decide together (k, T, policy, gate, pointer threshold, document cache), by the
    one rule that every caller shares: the CLI's commands, ``open_session``, and a service
    request's overrides (``Session.with_overrides``). A flag given wins; the tuned levers
    come only with the tuned policy."""
    resolved = resolve_policy(
        saved,
        meta,
        lmbda=settings.lmbda,
        temperature=settings.temperature,
        use_gate=settings.gate,
    )
    tuned = saved if resolved.source.startswith("tuned") else None
    return resolved, {
        "k": settings.top_k,
        "temperature": resolved.temperature,
        "policy": resolved.policy,
        "gate": resolved.gate,
        "pointer_min": pointer_min_for(settings, saved, resolved),
        "cache": document_cache(settings, knn_temperature=resolved.temperature, saved=tuned),
    }


def pointer_min_for(settings: KnnlmSettings, saved: SavedPolicy | None, resolved: Resolved) -> int:
    """The pointer threshold: the setting when given (0 turns it off), else the one tuned
    with the policy in use (``tune --fit-levers``), else 0."""
    if "pointer_min" in settings.model_fields_set or saved is None:
        return settings.pointer_min
    return saved.pointer_min if resolved.source.startswith("tuned") else 0


def document_cache(
    settings: KnnlmSettings, *, knn_temperature: float, saved: SavedPolicy | None = None
) -> DocumentCache | None:
    """The document cache the settings ask for, else the one ``saved`` (the policy in use)
    was tuned with; None at weight 0. Each setting given wins over the saved value, and an
    untuned temperature defaults to the kNN's, so the cache is as sharp as the datastore's
    memory."""
    weight, temperature = settings.cache_weight, settings.cache_temperature
    if saved is not None:
        if "cache_weight" not in settings.model_fields_set:
            weight = saved.cache_weight
        if temperature is None:
            temperature = saved.cache_temperature
    if not weight:
        return None
    from knn_store.doc_cache import DocumentCache

    return DocumentCache(temperature=temperature or knn_temperature, weight=weight)


def windows_for(settings: KnnlmSettings, lm: LanguageModel) -> tuple[int, int]:
    """Window and stride: the settings', else min(1024, the model's context) and half."""
    window = settings.window or lm.default_window()
    if window > lm.max_positions:
        raise ConfigError(
            f"--window ({window}) exceeds the model's context ({lm.max_positions} tokens)"
        )
    stride = settings.stride or max(1, window // 2)
    if stride > window:
        raise ConfigError(f"--stride ({stride}) must not exceed --window ({window})")
    return window, stride


def check_domains(store: KnnStore, domains: Sequence[str]) -> tuple[str, ...]:
    """``domains`` without repeats, each known to the collection, else ``UnknownDomain``."""
    wanted = tuple(dict.fromkeys(domains))
    if not wanted:
        return ()
    known = store.domains()
    unknown = [d for d in wanted if d not in known]
    if unknown:
        listing = ", ".join(f"{d} ({n:,} points)" for d, n in sorted(known.items())) or "none"
        raise UnknownDomain(
            f"collection {store.name!r} has no domain {', '.join(map(repr, unknown))}; "
            f"its domains: {listing}"
        )
    return wanted
