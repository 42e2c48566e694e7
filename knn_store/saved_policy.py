"""The tuned policy a collection carries, and how eval and generation pick T and lambda.

``knnlm tune`` saves a ``SavedPolicy`` with the collection. ``resolve_policy`` then decides,
in this order: an explicit ``--lambda`` (a fixed lambda) and ``--temperature`` win; otherwise
the saved policy and its T; otherwise the paper's defaults (lambda 0.25, T 1).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from knn_store.errors import StoreError
from knn_store.lambdas import FixedLambda, LambdaPolicy, policy_from_dict
from knn_store.store.base import CollectionMeta

DEFAULT_LAMBDA = 0.25
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class SavedPolicy:
    """A lambda policy with the temperature and k it was tuned for, and what it was tuned on."""

    policy: LambdaPolicy
    temperature: float
    k: int
    model_fingerprint: str
    key_type: str
    report: dict[str, Any] = field(default_factory=dict)  # tuning numbers, for `knnlm info`

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "temperature": self.temperature,
            "k": self.k,
            "model_fingerprint": self.model_fingerprint,
            "key_type": self.key_type,
            "report": self.report,
            "saved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, collection: str) -> SavedPolicy:
        try:
            return cls(
                policy=policy_from_dict(data["policy"]),
                temperature=float(data["temperature"]),
                k=int(data["k"]),
                model_fingerprint=str(data["model_fingerprint"]),
                key_type=str(data["key_type"]),
                report=dict(data.get("report", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"the tuned policy of collection {collection!r} is unreadable ({exc}); "
                "run `knnlm tune` again"
            ) from exc


@dataclass(frozen=True)
class Resolved:
    policy: LambdaPolicy
    temperature: float
    source: str  # "tuned", "flags" or "defaults", for reports


def resolve_policy(
    saved: SavedPolicy | None,
    meta: CollectionMeta,
    *,
    lmbda: float | None,
    temperature: float | None,
) -> Resolved:
    """The policy and T to use: explicit flags, else the saved policy, else the defaults.

    A saved policy tuned for other weights or another key type is ignored (the collection
    was rebuilt since), and so is one when ``--lambda`` is given.
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
            source,
        )
    assert saved is not None
    if temperature is not None:
        return Resolved(saved.policy, temperature, "tuned policy, T from flags")
    return Resolved(saved.policy, saved.temperature, "tuned")
