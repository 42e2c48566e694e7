"""Why the kNN-LM predicted what it did: per token, both distributions, lambda, the
neighbours with the text they were memorized from, and which lever served it: a search,
pointers followed from the last token (no search), or the gate's skip; and the document
cache's share.

It runs the same pipeline as eval (``KnnLM.score`` with full distributions) and yields its
rows batch by batch, so a long text shows progress as it goes. The hot path never reads
payloads; this does, for the few nearest neighbours it shows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from knn_store.knn_lm import KnnLM, Scored
from knn_store.progress import Progress, no_progress
from knn_store.results import Neighbour, TokenExplanation
from knn_store.store.base import CONTEXT_FIELD, DOMAIN_FIELD, OFFSET_FIELD, SOURCE_FIELD


def explain_text(
    knn_lm: KnnLM,
    text: str,
    *,
    top: int = 3,
    show_neighbours: int = 3,
    on_progress: Progress = no_progress,
) -> Iterator[TokenExplanation]:
    """One ``TokenExplanation`` per predicted token of ``text``, in order, as computed."""
    ids = knn_lm.lm.encode(text)
    for scored in knn_lm.score([ids], full=True, on_progress=on_progress, stage="explain"):
        yield from explain_scored(knn_lm, scored, top=top, show_neighbours=show_neighbours)


def explain_scored(
    knn_lm: KnnLM, scored: Scored, *, top: int = 3, show_neighbours: int = 3
) -> Iterator[TokenExplanation]:
    """The rows of one scored batch (``KnnLM.score(..., full=True)``), in its order."""
    assert scored.lm.lm_log_probs is not None and scored.knn_log_probs is not None
    assert scored.log_probs is not None and scored.neighbours.point_ids is not None
    lm = knn_lm.lm
    shown = scored.neighbours.point_ids[:, :show_neighbours]  # [m, s]
    wanted = [i for i in shown.ravel() if i is not None]
    payloads = knn_lm.store.retrieve(wanted, with_keys=False, with_payload=True)

    def piece(token_id: int) -> str:
        return lm.tokenizer.decode([token_id])

    def top_tokens(log_probs: torch.Tensor) -> list[tuple[str, float]]:
        values, index = log_probs.topk(min(top, log_probs.shape[-1]))
        return [
            (piece(int(i)), float(v.exp()))
            for v, i in zip(values, index, strict=True)
            if torch.isfinite(v)
        ]

    targets = scored.lm.targets
    followed, cache_lp, cache_w = scored.followed, scored.cache_log_prob, scored.cache_weight
    for j in range(len(scored)):
        near: list[Neighbour] = []
        for col, pid in enumerate(shown[j]):
            if pid is None:
                continue
            payload = (payloads.get(str(pid)) and payloads[str(pid)].payload) or {}
            near.append(
                Neighbour(
                    sq_distance=float(scored.neighbours.sq_distances[j, col]),
                    token=piece(int(scored.neighbours.token_ids[j, col])),
                    domain=payload.get(DOMAIN_FIELD),
                    source=payload.get(SOURCE_FIELD),
                    offset=payload.get(OFFSET_FIELD),
                    context=payload.get(CONTEXT_FIELD),
                )
            )
        yield TokenExplanation(
            position=int(scored.lm.position[j]) + 1,
            token=piece(int(targets[j])),
            prob=float(scored.log_prob[j].exp()),
            lm_prob=float(scored.lm.lm_target_log_prob[j].exp()),
            knn_prob=float(scored.knn_log_prob[j].exp()),
            lmbda=float(scored.lmbda[j]),
            searched=bool(scored.searched[j]),
            lm_top=top_tokens(scored.lm.lm_log_probs[j]),
            knn_top=top_tokens(scored.knn_log_probs[j]),
            neighbours=near,
            followed=followed is not None and bool(followed[j]),
            cache_prob=None if cache_lp is None else float(cache_lp[j].exp()),
            cache_weight=0.0 if cache_w is None else float(cache_w[j]),
        )
