"""Why the kNN-LM predicted what it did: per token, both distributions, lambda, and the
neighbours with the text they were memorized from.

The hot path never reads payloads; this does, for the few nearest neighbours it shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from knn_store.knn_lm import KnnLM
from knn_store.lm import LanguageModel
from knn_store.store.base import (
    CONTEXT_FIELD,
    DOMAIN_FIELD,
    OFFSET_FIELD,
    SOURCE_FIELD,
)
from knn_store.windows import sliding_windows


@dataclass(frozen=True)
class Neighbour:
    sq_distance: float
    token: str  # the value: the token that followed the stored context
    domain: str | None
    source: str | None
    offset: int | None  # token position in its document
    context: str | None  # text just before the value, as stored at ingest


@dataclass(frozen=True)
class TokenExplanation:
    position: int  # position of the predicted token in the text (BOS = 0)
    token: str  # the token that actually came next
    prob: float  # kNN-LM probability of it
    lm_prob: float
    knn_prob: float
    lmbda: float
    lm_top: list[tuple[str, float]]
    knn_top: list[tuple[str, float]]
    neighbours: list[Neighbour]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain_text(
    lm: LanguageModel,
    knn_lm: KnnLM,
    text: str,
    *,
    window: int,
    stride: int,
    top: int = 3,
    show_neighbours: int = 3,
) -> list[TokenExplanation]:
    """One ``TokenExplanation`` per predicted token of ``text``."""
    ids = lm.encode(text)
    out: list[TokenExplanation] = []
    for win in sliding_windows(len(ids), window=window, stride=stride):
        rows = torch.from_numpy(win.positions - win.start)  # [m]
        forward = lm.forward(ids[None, win.start : win.end], with_logits=True)
        assert forward.logits is not None
        lm_lp = torch.log_softmax(forward.logits[0, rows].float(), dim=-1)  # [m, V]
        neighbours = knn_lm.neighbours(forward.keys[0, rows])
        knn_lp, lmbda, mixed = knn_lm.distributions(lm_lp, neighbours)
        targets = torch.from_numpy(ids[win.positions + 1])  # [m]

        assert neighbours.point_ids is not None  # every backend returns the ids
        shown = neighbours.point_ids[:, :show_neighbours]  # [m, s]
        wanted = [i for i in shown.ravel() if i is not None]
        payloads = knn_lm.store.retrieve(wanted, with_keys=False, with_payload=True)

        def top_tokens(log_probs: torch.Tensor) -> list[tuple[str, float]]:
            values, index = log_probs.topk(top)
            return [
                (_piece(lm, int(i)), float(v.exp()))
                for v, i in zip(values, index, strict=True)
                if torch.isfinite(v)
            ]

        for j, position in enumerate(win.positions):
            t = targets[j : j + 1]
            near: list[Neighbour] = []
            for col in range(shown.shape[1]):
                pid = shown[j, col]
                if pid is None:
                    continue
                payload = payloads[str(pid)].payload if str(pid) in payloads else None
                payload = payload or {}
                near.append(
                    Neighbour(
                        sq_distance=float(neighbours.sq_distances[j, col]),
                        token=_piece(lm, int(neighbours.token_ids[j, col])),
                        domain=payload.get(DOMAIN_FIELD),
                        source=payload.get(SOURCE_FIELD),
                        offset=payload.get(OFFSET_FIELD),
                        context=payload.get(CONTEXT_FIELD),
                    )
                )
            out.append(
                TokenExplanation(
                    position=int(position) + 1,
                    token=_piece(lm, int(t)),
                    prob=float(mixed[j].gather(0, t).exp()),
                    lm_prob=float(lm_lp[j].gather(0, t).exp()),
                    knn_prob=float(knn_lp[j].gather(0, t).exp()),
                    lmbda=float(lmbda[j]),
                    lm_top=top_tokens(lm_lp[j]),
                    knn_top=top_tokens(knn_lp[j]),
                    neighbours=near,
                )
            )
    return out


def _piece(lm: LanguageModel, token_id: int) -> str:
    return lm.tokenizer.decode([token_id])
