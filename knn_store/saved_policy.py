"""The tuned policy a collection carries, and how eval and generation pick T and lambda.

``knnlm tune`` saves a ``SavedPolicy`` with the collection. ``resolve_policy`` then decides,
in this order: an explicit ``--lambda`` (a fixed lambda) and ``--temperature`` win; otherwise
the saved policy and its T; otherwise the paper's defaults (lambda 0.25, T 1). The saved
retrieval gate applies with the saved policy, unless ``--no-gate``; so do the document cache
and the pointer threshold of ``knnlm tune --fit-levers``, unless their settings are given
(an explicit 0 turns them off). A policy saved before those levers existed has them off.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from knn_store.errors import StoreDamaged
from knn_store.gate import RetrievalGate
from knn_store.lambdas import FixedLambda, LambdaPolicy, policy_from_dict
from knn_store.store.base import CollectionMeta, KnnStore

DEFAULT_LAMBDA = 0.25
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class SavedPolicy:
    """A lambda policy with the temperature and k it was tuned for, what it was tuned on,
    and the retrieval gate fitted with it."""

    policy: LambdaPolicy
    temperature: float
    k: int
    model_fingerprint: str
    key_type: str
    gate: RetrievalGate | None = None
    domains: tuple[str, ...] = ()  # the domains retrieval was restricted to; () = all
    report: dict[str, Any] = field(default_factory=dict)  # tuning numbers, for `knnlm info`
    # fitted with the policy by `tune --fit-levers`; 0 / None: off
    pointer_min: int = 0
    cache_weight: float = 0.0
    cache_temperature: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "temperature": self.temperature,
            "k": self.k,
            "model_fingerprint": self.model_fingerprint,
            "key_type": self.key_type,
            "gate": None if self.gate is None else self.gate.to_dict(),
            "domains": list(self.domains),
            "report": self.report,
            "pointer_min": self.pointer_min,
            "cache_weight": self.cache_weight,
            "cache_temperature": self.cache_temperature,
            "saved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_dict(cls, data: Any, *, collection: str) -> SavedPolicy:
        """Read back what ``to_dict`` wrote, checking every field: a value of the wrong
        type, a number that is not finite or out of its range is ``StoreDamaged``."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            gate = data.get("gate")
            temperature, k = data["temperature"], data["k"]
            # bool is an int to Python; "8" or 2.5 is no k, and T must be a number
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"k must be an integer, got {k!r}")
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError(f"the temperature must be a number, got {temperature!r}")
            domains = data.get("domains", [])
            if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
                raise TypeError(f"domains must be a list of names, got {domains!r}")
            pointer_min = data.get("pointer_min", 0)  # absent: saved before the levers
            if isinstance(pointer_min, bool) or not isinstance(pointer_min, int):
                raise TypeError(f"pointer_min must be an integer, got {pointer_min!r}")
            cache_weight = data.get("cache_weight", 0.0)
            cache_temperature = data.get("cache_temperature")
            if isinstance(cache_weight, bool) or not isinstance(cache_weight, (int, float)):
                raise TypeError(f"cache_weight must be a number, got {cache_weight!r}")
            if cache_temperature is not None and (
                isinstance(cache_temperature, bool)
                or not isinstance(cache_temperature, (int, float))
                or not 0 < cache_temperature < float("inf")
            ):
                raise TypeError(f"cache_temperature must be positive, got {cache_temperature!r}")
            if pointer_min < 0 or not 0 <= cache_weight <= 1:
                raise ValueError(
                    f"pointer_min must be >= 0 and cache_weight in [0, 1], got {pointer_min} "
                    f"and {cache_weight}"
                )
            for name in ("model_fingerprint", "key_type"):
                if not isinstance(data[name], str):
                    raise TypeError(f"{name} must be text, got {data[name]!r}")
            saved = cls(
                policy=policy_from_dict(data["policy"]),
                temperature=float(temperature),
                k=k,
                model_fingerprint=data["model_fingerprint"],
                key_type=data["key_type"],
                gate=None if gate is None else RetrievalGate.from_dict(gate),
                domains=tuple(domains),
                report=dict(data.get("report", {})),
                pointer_min=pointer_min,
                cache_weight=float(cache_weight),
                cache_temperature=None if cache_temperature is None else float(cache_temperature),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreDamaged(
                f"the tuned policy of collection {collection!r} is unreadable ({exc}); "
                "run `knnlm tune` again"
            ) from exc
        if not (saved.temperature > 0 and saved.temperature < float("inf")) or saved.k < 1:
            raise StoreDamaged(
                f"the tuned policy of collection {collection!r} has T={saved.temperature} "
                f"and k={saved.k}; run `knnlm tune` again"
            )
        return saved


@dataclass(frozen=True)
class Resolved:
    policy: LambdaPolicy
    temperature: float
    gate: RetrievalGate | None
    source: str  # "tuned", "flags" or "defaults", for reports


def resolve_policy(
    saved: SavedPolicy | None,
    meta: CollectionMeta,
    *,
    lmbda: float | None,
    temperature: float | None,
    use_gate: bool = True,
) -> Resolved:
    """The policy, T and gate to use: explicit flags, else the saved policy, else defaults.

    A saved policy tuned for other weights or another key type is ignored (the collection
    was rebuilt since), and so is one when ``--lambda`` is given. The gate was fitted for
    the saved policy, so it goes with it.
    """
    usable = (
        saved is not None
        and saved.model_fingerprint == meta.model_fingerprint
        and saved.key_type == meta.key_type
    )
    if lmbda is not None or not usable:
        source = "flags" if lmbda is not None or temperature is not None else "defaults"
        return Resolved(
            FixedLambda(DEFAULT_LAMBDA if lmbda is None else lmbda),
            DEFAULT_TEMPERATURE if temperature is None else temperature,
            None,
            source,
        )
    assert saved is not None
    gate = saved.gate if use_gate else None
    if temperature is not None:
        return Resolved(saved.policy, temperature, gate, "tuned policy, T from flags")
    return Resolved(saved.policy, saved.temperature, gate, "tuned")


def verify_policy(raw: dict[str, Any], store: KnnStore) -> str:
    """What ``knnlm check`` says of a collection's saved policy: a one-line description,
    or a ``KnnlmError`` when it is unreadable or was tuned for another model."""
    saved = SavedPolicy.from_dict(raw, collection=store.name)
    assert store.meta is not None
    if saved.model_fingerprint != store.meta.model_fingerprint:
        raise StoreDamaged("tuned for another model: eval ignores it; run `knnlm tune` again")
    gate = "" if saved.gate is None else f", gate {saved.gate.threshold:.3g}"
    if saved.cache_weight:
        t = saved.cache_temperature or saved.temperature
        gate += f", cache {saved.cache_weight:g} at T={t:.4g}"
    if saved.pointer_min:
        gate += f", pointers >= {saved.pointer_min}"
    policy = saved.to_dict()["policy"]
    per_position = " per position" if policy.get("temperature_layers") is not None else ""
    return f"{policy['kind']}, T={saved.temperature:.4g}{per_position}{gate}"
