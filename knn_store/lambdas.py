"""Lambda policies: how much weight p_kNN gets at each position.

A policy maps ``QueryFeatures`` (what retrieval and the LM say about one position) to a lambda
per query. Policies hold no state across calls, so eval and generation give the same answer
at the same position. Three kinds:

- ``FixedLambda``: one lambda everywhere (Khandelwal et al.);
- ``BucketLambda``: equal-population buckets of one feature, one lambda each (Drozdov et
  al. use the nearest squared distance ``d_min``; ``cosine`` is the other choice here);
- ``LearnedLambda``: a small logistic or MLP model of several cheap features; optionally
  with a second head that sets the kNN temperature per position from the same features.

Every policy gives lambda = 0 to a query without any neighbour, which keeps the LM's
distribution there. ``policy.temperatures(features, base)`` is the kNN temperature at each
position: ``base`` (the collection's T) for every policy but a learned one with a
temperature head. ``policy_from_dict`` reads back what ``to_dict`` wrote.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

FEATURES = ("d_min", "cosine", "lm_entropy", "lm_max_prob", "agreement")
MAX_LAMBDA = 0.99  # the largest lambda a tuned policy gives (the grid's top)
AGREEMENT_TOP = 16  # "agreement": share of the nearest 16 neighbours voting like the nearest
# A temperature head scales T by exp(g), g within +-ln(1000): a bound, so that features far
# outside the tuning data (a linear head is unbounded) cannot send T to 0 or infinity.
MAX_LOG_TEMPERATURE_SCALE = math.log(1000.0)


@dataclass(frozen=True)
class QueryFeatures:
    """Per-query evidence a policy may use. Shapes: ``b`` queries, ``k`` neighbours.

    sq_distances: float [b, k], ascending, +inf where missing.
    token_ids: int [b, k], -1 where missing.
    lm_entropy: float [b], entropy of the LM's next-token distribution (nats).
    lm_max_log_prob: float [b], log of the LM's top probability.
    cosine: float [b], cosine similarity of the query and its nearest key; None when the
        policy does not need it (it costs one extra lookup per query).
    """

    sq_distances: torch.Tensor
    token_ids: torch.Tensor
    lm_entropy: torch.Tensor
    lm_max_log_prob: torch.Tensor
    cosine: torch.Tensor | None = None

    @functools.cached_property
    def has_neighbour(self) -> torch.Tensor:
        """bool [b]; computed once (tuning asks for it at every temperature)."""
        return torch.isfinite(self.sq_distances[:, 0])

    def column(self, name: str) -> torch.Tensor:
        """One named feature, float32 [b]. Rows without neighbours hold finite filler."""
        if name == "d_min":
            d = self.sq_distances[:, 0].float()
            return torch.where(torch.isfinite(d), d, torch.finfo(torch.float32).max)
        if name == "cosine":
            if self.cosine is None:
                raise ValueError("the cosine feature was not computed for these queries")
            return self.cosine.float()
        if name == "lm_entropy":
            return self.lm_entropy.float()
        if name == "lm_max_prob":
            return self.lm_max_log_prob.float().exp()
        if name == "agreement":
            top = self.token_ids[:, :AGREEMENT_TOP]
            same = (top == top[:, :1]) & (top >= 0)
            return same.float().mean(-1)
        raise ValueError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def finite_numbers(name: str, values: Iterable[Any]) -> list[float]:
    """``values`` as floats; ``ValueError`` unless each is a real number, finite in
    float32 (what policies compute in). A bool, a string or a NaN in a saved policy is
    damage, never a number to compute with."""
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be numbers, got {value!r}")
        if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            raise ValueError(f"{name} must be finite, got {value}")
        out.append(float(value))
    return out


class LambdaPolicy(Protocol):
    needs_cosine: bool

    def __call__(self, features: QueryFeatures) -> torch.Tensor:
        """Lambdas in [0, 1], float32 [b]."""
        ...

    def temperatures(self, features: QueryFeatures, base: float) -> float | torch.Tensor:
        """The kNN temperature: ``base`` everywhere, or float32 [b], one finite T > 0 per
        query."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


class FixedLambda:
    """The same lambda everywhere (Khandelwal et al.'s interpolation).

    >>> import torch
    >>> sq = torch.tensor([[1.0, 2.0], [float("inf"), float("inf")]])
    >>> f = QueryFeatures(sq, torch.tensor([[3, 4], [-1, -1]]), torch.zeros(2), torch.zeros(2))
    >>> FixedLambda(0.25)(f)
    tensor([0.2500, 0.0000])
    """

    needs_cosine = False

    def __init__(self, lmbda: float) -> None:
        (lmbda,) = finite_numbers("`lmbda`", [lmbda])
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"`lmbda` must lie in [0, 1], got {lmbda}")
        self.lmbda = float(lmbda)

    def __call__(self, features: QueryFeatures) -> torch.Tensor:
        return torch.where(features.has_neighbour, self.lmbda, 0.0).to(torch.float32)

    def temperatures(self, features: QueryFeatures, base: float) -> float:
        return base

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "lambda": self.lmbda}

    def __repr__(self) -> str:
        return f"FixedLambda({self.lmbda})"


class BucketLambda:
    """One lambda per bucket of a feature (Drozdov et al. 2022).

    Args:
        feature: ``"d_min"`` (squared distance to the nearest key) or ``"cosine"``.
        edges: ascending inner bucket edges, B - 1 floats; value v falls in bucket
            ``searchsorted(edges, v, right=True)``.
        lambdas: B lambdas.
    """

    def __init__(self, feature: str, edges: list[float], lambdas: list[float]) -> None:
        if feature not in ("d_min", "cosine"):
            raise ValueError(f"bucket feature must be 'd_min' or 'cosine', got {feature!r}")
        if len(lambdas) != len(edges) + 1:
            raise ValueError(
                f"{len(edges)} edges need {len(edges) + 1} lambdas, not {len(lambdas)}"
            )
        edges = finite_numbers("bucket edges", edges)
        if any(not 0.0 <= x <= 1.0 for x in finite_numbers("bucket lambdas", lambdas)):
            raise ValueError("every lambda must lie in [0, 1]")
        if any(b < a for a, b in itertools.pairwise(edges)):
            raise ValueError("bucket edges must be ascending")
        self.feature = feature
        self.edges = [float(e) for e in edges]
        self.lambdas = [float(x) for x in lambdas]
        self.needs_cosine = feature == "cosine"
        self._edges = torch.tensor(self.edges, dtype=torch.float32)
        self._lambdas = torch.tensor(self.lambdas, dtype=torch.float32)

    def buckets(self, features: QueryFeatures) -> torch.Tensor:
        """int64 [b], each query's bucket."""
        values = features.column(self.feature).contiguous()
        return torch.searchsorted(self._edges.to(values.device), values, right=True)

    def __call__(self, features: QueryFeatures) -> torch.Tensor:
        lmbda = self._lambdas.to(features.sq_distances.device)[self.buckets(features)]
        return torch.where(features.has_neighbour, lmbda, 0.0)

    def temperatures(self, features: QueryFeatures, base: float) -> float:
        return base

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "buckets",
            "feature": self.feature,
            "edges": self.edges,
            "lambdas": self.lambdas,
        }

    def __repr__(self) -> str:
        return f"BucketLambda({self.feature!r}, {len(self.lambdas)} buckets)"


Layers = list[tuple[list[list[float]], list[float]]]  # [(weight [out, in], bias [out]), ...]


def _checked_layers(
    name: str, layers: Layers, width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``layers`` as float32 tensors, checked to chain from ``width`` inputs to one output
    with finite weights: a damaged saved policy fails when it is read, not in the middle of
    an eval with a matrix error."""
    out = [
        (torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
        for w, b in layers
    ]
    for i, (w, b) in enumerate(out):
        if w.dim() != 2 or b.dim() != 1 or w.shape != (b.shape[0], width):
            raise ValueError(
                f"{name} layer {i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}; "
                f"expected (n, {width}) and (n,)"
            )
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ValueError(f"{name} layer {i} has weights that are not finite float32 numbers")
        width = b.shape[0]
    if width != 1:
        raise ValueError(f"the last {name} layer must give one output, not {width}")
    return out


def _mlp(layers: list[tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor) -> torch.Tensor:
    """float [b, f] through linear layers with tanh between them -> [b]."""
    for i, (w, b) in enumerate(layers):
        h = h @ w.to(h.device).T + b.to(h.device)
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return h.squeeze(-1)


def bounded_log_scale(raw: torch.Tensor) -> torch.Tensor:
    """A temperature head's raw output [b] -> g = log(T / base) [b], within
    +-``MAX_LOG_TEMPERATURE_SCALE``: a soft bound, the identity near 0 (so a head at zero
    keeps the base T exactly) and smooth everywhere, so training sees a gradient."""
    return MAX_LOG_TEMPERATURE_SCALE * torch.tanh(raw / MAX_LOG_TEMPERATURE_SCALE)


class LearnedLambda:
    """lambda = sigmoid(MLP(standardized features)); no hidden layer is logistic regression.

    With ``temperature_layers``, a second small MLP of the same standardized features sets
    the kNN temperature per position: T(x) = base * exp(g(x)), where base is the
    collection's T and g the head's output, softly bounded to +-ln(1000). The scale is
    multiplicative because T divides squared distances: the right T differs by factors
    between kinds of positions, and g = 0 is exactly the global T the head was trained
    from. A ``--temperature`` given at eval time moves the base, and every position with it.

    Args:
        features: names from ``FEATURES``.
        mean, std: per-feature standardization, fit on the tuning data.
        layers: ``[(weight [out, in], bias [out]), ...]`` as nested lists; tanh between
            layers, one output.
        temperature_layers: the temperature head, in the same form; None: the base T
            everywhere (a policy saved before the head existed).
    """

    def __init__(
        self,
        features: list[str],
        mean: list[float],
        std: list[float],
        layers: Layers,
        temperature_layers: Layers | None = None,
    ) -> None:
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        if not layers or len(mean) != len(features) or len(std) != len(features):
            raise ValueError("a learned policy needs layers and one mean/std per feature")
        if temperature_layers is not None and not temperature_layers:
            raise ValueError("a temperature head needs at least one layer")
        mean = finite_numbers("feature means", mean)
        if any(s <= 0 for s in finite_numbers("feature scales", std)):
            raise ValueError("feature scales must be positive")
        self.features = list(features)
        self.mean = [float(x) for x in mean]
        self.std = [float(x) for x in std]
        self.layers = [(w, b) for w, b in layers]
        self.temperature_layers = (
            None if temperature_layers is None else [(w, b) for w, b in temperature_layers]
        )
        self.needs_cosine = "cosine" in self.features
        self._mean = torch.tensor(self.mean)
        self._std = torch.tensor(self.std)
        self._layers = _checked_layers("lambda", self.layers, len(self.features))
        self._temperature_layers = (
            None
            if self.temperature_layers is None
            else _checked_layers("temperature", self.temperature_layers, len(self.features))
        )

    @property
    def learns_temperature(self) -> bool:
        return self._temperature_layers is not None

    @staticmethod
    def inputs(features: QueryFeatures, names: list[str]) -> torch.Tensor:
        """Raw model inputs, float32 [b, len(names)]; distances enter as log(1 + d_min)."""
        cols = [features.column(n) for n in names]
        cols = [
            c.clamp(max=1e30).log1p() if n == "d_min" else c
            for n, c in zip(names, cols, strict=True)
        ]
        return torch.stack(cols, dim=-1)

    def _standardized(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output for raw inputs float [b, f] -> [b]."""
        return _mlp(self._layers, self._standardized(x))

    def log_temperature_scales(self, x: torch.Tensor) -> torch.Tensor:
        """g = log(T / base) for raw inputs float [b, f] -> [b]; zeros without a head."""
        if self._temperature_layers is None:
            return torch.zeros(len(x), dtype=torch.float32, device=x.device)
        return bounded_log_scale(_mlp(self._temperature_layers, self._standardized(x)))

    def __call__(self, features: QueryFeatures) -> torch.Tensor:
        # At most the grid's 0.99: a saturated sigmoid rounds to 1.0 in float32, which would
        # give the LM no say and a token no neighbour voted for probability 0.
        lmbda = torch.sigmoid(self.logits(self.inputs(features, self.features))).clamp(
            max=MAX_LAMBDA
        )
        return torch.where(features.has_neighbour, lmbda, 0.0)

    def temperatures(self, features: QueryFeatures, base: float) -> float | torch.Tensor:
        """``base`` without a temperature head; with one, float32 [b]: base * exp(g(x)),
        computed in float64 and kept within float32's positive finite range, so every
        position gets a T the kNN math accepts."""
        if self._temperature_layers is None:
            return base
        if not math.isfinite(base) or base <= 0:
            raise ValueError(f"the base temperature must be finite and positive, got {base}")
        g = self.log_temperature_scales(self.inputs(features, self.features))  # [b]
        t = (g.double() + math.log(base)).exp()  # [b]
        tiny = torch.finfo(torch.float32).tiny
        return t.clamp(min=tiny, max=_FLOAT32_MAX).float()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "learned",
            "features": self.features,
            "mean": self.mean,
            "std": self.std,
            "layers": [[w, b] for w, b in self.layers],
        }
        if self.temperature_layers is not None:  # absent: what a policy without one wrote
            out["temperature_layers"] = [[w, b] for w, b in self.temperature_layers]
        return out

    def __repr__(self) -> str:
        hidden = [len(b) for _, b in self.layers[:-1]]
        head = ""
        if self.temperature_layers is not None:
            head = f", temperature_hidden={[len(b) for _, b in self.temperature_layers[:-1]]}"
        return f"LearnedLambda({self.features}, hidden={hidden}{head})"


def policy_from_dict(data: dict[str, Any]) -> LambdaPolicy:
    """Rebuild a policy from ``to_dict()`` output."""
    kind = data.get("kind")
    if kind == "fixed":
        return FixedLambda(data["lambda"])
    if kind == "buckets":
        return BucketLambda(data["feature"], data["edges"], data["lambdas"])
    if kind == "learned":
        layers = [(w, b) for w, b in data["layers"]]
        head = data.get("temperature_layers")  # absent: saved before the temperature head
        return LearnedLambda(
            data["features"],
            data["mean"],
            data["std"],
            layers,
            None if head is None else [(w, b) for w, b in head],
        )
    raise ValueError(f"unknown lambda policy kind {kind!r}")
