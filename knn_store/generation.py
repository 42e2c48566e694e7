"""Generation with the kNN-LM through transformers' own ``generate``.

``KnnLogitsProcessor`` replaces the LM's next-token scores by the kNN-LM's log-probabilities.
It reads the key of the newest position from the same hook point that ingest and eval use,
so at any position it returns exactly the distribution ``knnlm eval`` scores there.

    >>> with KnnLogitsProcessor(lm, knn_lm) as knn:                     # doctest: +SKIP
    ...     out = lm.model.generate(ids, logits_processor=LogitsProcessorList([knn]))

transformers applies a user's processors before its sampling warpers, so ``temperature``,
``top_k`` and ``top_p`` of ``generate`` shape the interpolated distribution.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from knn_store.knn_lm import KnnLM
from knn_store.lm import LanguageModel


class KnnLogitsProcessor(LogitsProcessor):
    """Interpolates ``knn_lm``'s retrieval into every step of ``lm.model.generate``.

    Registers a forward hook on the LM's key module while open; use it as a context
    manager (or call ``close()``) so the hook goes away afterwards.
    """

    def __init__(self, lm: LanguageModel, knn_lm: KnnLM) -> None:
        self.lm = lm
        self.knn_lm = knn_lm
        self._key: torch.Tensor | None = None  # float [b, dim], the newest position's key
        self._handle = lm.key_module.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))  # [b, t, dim]
        self._key = hidden[:, -1].detach().float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._key is None:
            raise RuntimeError("no key captured: the processor must run inside lm.model.generate")
        keys, self._key = self._key, None
        if keys.shape[0] != scores.shape[0]:
            raise RuntimeError(
                f"captured {keys.shape[0]} keys for {scores.shape[0]} rows of scores; "
                "beam search and other row-changing strategies are not supported"
            )
        lm_log_probs = torch.log_softmax(scores.float(), dim=-1)  # [b, V]
        mixed = self.knn_lm.next_token_log_probs(lm_log_probs, self.knn_lm.neighbours(keys))
        return mixed.to(scores.dtype)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> KnnLogitsProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
