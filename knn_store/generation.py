"""Generation with the kNN-LM.

Two ways in, one distribution: at every step both give what ``knnlm eval`` scores there.

- ``decode``: knnlm's own batched decoding loop (KV cache, left padding, per-row sampling
  and seeds). ``knnlm generate`` and the HTTP service use it, so a completion with a seed is
  the same from either. It also carries pointer following and the document cache from step
  to step, per row (``KnnLM.uses_memory``).
- ``KnnLogitsProcessor``: puts the kNN-LM into transformers' own ``generate``:

    >>> with KnnLogitsProcessor(knn_lm) as knn:                          # doctest: +SKIP
    ...     out = knn_lm.lm.model.generate(ids, logits_processor=LogitsProcessorList([knn]))

  transformers applies a user's processors before its sampling warpers, so ``temperature``,
  ``top_k`` and ``top_p`` of ``generate`` shape the interpolated distribution. It is
  stateless: it never sees the prompt's positions, so it refuses a kNN-LM with pointer
  following or a document cache (``ConfigError``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from knn_store.decode_memory import DecodeMemory
from knn_store.errors import ConfigError
from knn_store.knn_lm import KnnLM
from knn_store.lm import KeyCapture

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Sampling:
    """How one sequence is continued.

    temperature: sampling temperature over the interpolated distribution; 0 = greedy.
    top_k: sample among the k likeliest tokens only; 0 = all.
    top_p: nucleus sampling: the smallest set of tokens holding this much probability.
    seed: random seed of this sequence (None: unseeded); torch's range, -2**63 .. 2**64 - 1.
    max_new_tokens: tokens to add at most (fewer if an end-of-text token comes).
    knn: False samples from the base LM alone.
    min_p: keep only tokens at least this fraction as likely as the likeliest (after
        temperature); 0 = all.
    repetition_penalty: multiplies the log-probability (< 0) of every token already in
        the prompt or the output by this much, as vLLM and transformers do to negative
        logits: p becomes p ** penalty (unnormalized); > 1 discourages repeats, 1 = off.
    min_tokens: no end-of-text token can be drawn before this many new tokens.
    ignore_eos: an end-of-text token does not end the sequence (it still counts).

    Order of work at each step, as vLLM's: repetition penalty and min_tokens on the
    interpolated log-probabilities, then temperature (0: the likeliest left), min_p, top_k,
    top_p.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    knn: bool = True
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < float("inf"):
            raise ConfigError(
                f"sampling temperature must be finite and >= 0, got {self.temperature}"
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed must lie in [-2**63, 2**64 - 1], got {self.seed}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must lie in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ConfigError(
                f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}"
            )
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_tokens must lie in [0, max_new_tokens = {self.max_new_tokens}], "
                f"got {self.min_tokens}"
            )


def sample_next(
    log_probs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> int:
    """One token from log-probabilities float [V] under ``sampling`` (its temperature,
    min_p, top_k and top_p: ``penalize`` comes before, over the batch)."""
    if sampling.temperature == 0:
        return int(log_probs.argmax())
    probs = sampling_probs(log_probs, sampling)
    if probs is None:  # nothing has a finite log-probability: nothing to weigh
        return int(log_probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def sampling_probs(log_probs: torch.Tensor, sampling: Sampling) -> torch.Tensor | None:
    """The distribution float64 [V] that ``sample_next`` draws from, for a temperature > 0;
    None where no token has a finite log-probability.

    Safe for every finite temperature > 0, min_p in [0, 1] and top_p in (0, 1]: the work
    is in float64 on logits shifted so that the likeliest token is at 0, so a tiny
    temperature sends every other token to -inf (probability 0: greedy) instead of
    overflowing into inf - inf = nan, and the likeliest token always survives min_p, top_k
    and top_p.
    """
    logits = log_probs.double()  # [V]
    best = logits.max()
    if not torch.isfinite(best):
        return None
    logits = (logits - best) / sampling.temperature  # <= 0, exactly 0 at the likeliest
    if sampling.min_p > 0:  # p / p_max >= min_p, in log space: the likeliest stays (0 >= ln)
        logits = logits.masked_fill(logits < math.log(sampling.min_p), float("-inf"))
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        order = logits.argsort(descending=True)  # [V]
        probs = logits[order].softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        drop[0] = False
        logits[order[drop]] = float("-inf")
    return logits.softmax(-1)


def penalize(
    log_probs: torch.Tensor,
    seen: torch.Tensor | None,
    penalty: torch.Tensor,
    young: torch.Tensor,
    end_ids: Sequence[int],
) -> torch.Tensor:
    """Repetition penalty and min_tokens over a batch, before each row's sampling.

    log_probs: float [b, V]. seen: bool [b, V], the tokens each row's prompt and output
    hold (None: no row has a penalty). penalty: float [b] (1: none). young: bool [b], the
    rows that may not end yet. end_ids: the tokens that would end them. Returns a new
    float [b, V]: a seen token's ln p times the penalty where it is < 0 (divided where it
    is > 0, for logits), and -inf at ``end_ids`` in young rows.
    """
    shaped = log_probs
    if seen is not None:
        factor = penalty[:, None].to(log_probs)  # [b, 1]
        hit = torch.where(log_probs < 0, log_probs * factor, log_probs / factor)
        shaped = torch.where(seen, hit, log_probs)
    if end_ids and bool(young.any()):
        shaped = shaped.clone() if shaped is log_probs else shaped
        ends = torch.as_tensor(list(end_ids), dtype=torch.long)
        shaped[young.nonzero()[:, :1], ends] = float("-inf")  # [y, 1] x [e] -> [y, e]
    return shaped


@dataclass(frozen=True)
class Step:
    """One decoded token of one row, as ``decode`` reports it.

    token: the token sampled.
    log_prob: its ln p under the distribution sampled from, before the repetition
        penalty, min_tokens, temperature, min_p, top_k and top_p reshape it (the
        interpolated one, or the LM's where ``Sampling.knn`` is False).
    top: the ``top_logprobs`` likeliest tokens there, (token, ln p), likeliest first.
    followed: whether the step took its neighbours from followed pointers instead of a
        search; None where pointer following is off (or the row does not use the kNN-LM).
    searched: whether the step searched the datastore (False: the gate skipped it, or
        pointers served); None where the row does not use the kNN-LM.
    last: whether the row ends with this token (an end-of-text token that ends it, or its
        ``max_new_tokens``-th).
    """

    token: int
    log_prob: float
    top: tuple[tuple[int, float], ...] = ()
    followed: bool | None = None
    searched: bool | None = None
    last: bool = False


# on_token(row, step) -> False ends that row now (a stop string, a client gone, a deadline)
OnToken = Callable[[int, Step], "bool | None"]
# on_error(row, error): sampling row failed; the row ends, the others go on
OnError = Callable[[int, Exception], None]


def decode(
    knn_lm: KnnLM,
    prompts: Sequence[np.ndarray],
    sampling: Sequence[Sampling],
    *,
    on_token: OnToken | None = None,
    on_error: OnError | None = None,
    top_logprobs: int = 0,
) -> list[list[int]]:
    """Continue token ``prompts`` (int64 [n_i], BOS first) together, one step per token.

    Prompts are left-padded into one batch and share each step's LM forward (with a KV cache)
    and one batched search. Each row samples with its own ``Sampling`` and seed, so the
    tokens a row draws do not depend on what else is in the batch (its numbers agree with a
    solo run to float rounding: see README "Service"). ``on_token(row, step)`` is called as
    tokens come, for streaming; when it returns False the row ends there. A row whose
    sampling raises ends with ``on_error(row, error)`` when given (the error propagates
    otherwise), and the others go on. ``top_logprobs`` likeliest tokens are reported per
    step. Returns the new tokens per prompt (an end-of-text token included, which ends its
    row).

    With pointer following or a document cache on (``KnnLM.uses_memory``), each row keeps
    its own memory (``DecodeMemory.start``): the first forward's keys of every prompt
    position feed it (``DecodeMemory.read_prompts``), each step scores from it
    (``DecodeMemory.step``) and then records the token drawn (``DecodeMemory.advance``), so a
    step's distribution is what ``KnnLM.score`` gives at that position of prompt plus
    tokens so far. Rows never see each other's memory.
    """
    lm = knn_lm.lm
    if len(prompts) != len(sampling) or not prompts:
        raise ValueError("give one Sampling per prompt, and at least one prompt")
    longest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, sampling, strict=True))
    if longest > lm.max_positions:
        raise ConfigError(
            f"prompt plus new tokens ({longest}) exceeds the model's context "
            f"({lm.max_positions} tokens)"
        )
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt needs at least one token")
    if top_logprobs < 0:
        raise ValueError("top_logprobs must be >= 0")
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's last token is real
        ids[row, width - len(p) :] = torch.as_tensor(p)
        mask[row, width - len(p) :] = 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, width]
    generators = [
        None if s.seed is None else torch.Generator().manual_seed(s.seed) for s in sampling
    ]
    wants_knn = np.array([s.knn for s in sampling])
    memory = (
        DecodeMemory.start(knn_lm, [len(p) for p in prompts])
        if knn_lm.uses_memory and wants_knn.any()
        else None
    )
    stop = set(lm.stop_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    active = np.ones(b, dtype=bool)
    drawn = np.zeros(b, dtype=np.int64)  # [b], new tokens so far
    # rows whose end-of-text tokens are masked until they have drawn this many (ignore_eos:
    # an end token ends nothing, so nothing to hold back)
    min_tokens = np.array([0 if s.ignore_eos else s.min_tokens for s in sampling])  # [b]
    ends = np.array([not s.ignore_eos for s in sampling])  # [b], rows an end token ends
    penalty = torch.tensor([s.repetition_penalty for s in sampling], dtype=torch.float32)  # [b]
    seen: torch.Tensor | None = None  # bool [b, V] once the vocabulary is known
    # transformers 5 renamed the KV cache argument and output from past_key_values to cache
    cache_name = (
        "cache"
        if "cache" in inspect.signature(lm.model.forward).parameters
        else ("past_key_values")
    )
    cache: Any = None
    # with a memory, the first forward's keys of every prompt position are kept
    with lm.capture_keys(last_only=memory is None) as capture, torch.inference_mode():
        while active.any():
            result = lm.model(
                input_ids=ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                position_ids=position.to(lm.device),
                use_cache=True,
                **{cache_name: cache},
            )
            keys = capture.pop()  # [b, dim], each row's newest position ([b, t, dim]: all)
            if memory is not None:
                if cache is None:  # the first forward: the prompts' own positions
                    _read_prompts(knn_lm, memory, prompts, wants_knn, keys, result.logits)
                keys = keys[:, -1]
            cache = getattr(result, cache_name)
            log_probs = torch.log_softmax(result.logits[:, -1].float(), dim=-1)  # [b, V]
            knn_rows = np.flatnonzero(active & wants_knn)
            searched = np.zeros(b, dtype=bool)  # [b], the rows whose step searched
            if len(knn_rows):  # one batched search for every row that wants retrieval
                index = torch.from_numpy(knn_rows).to(log_probs.device)
                if memory is None:
                    mixed, gated = knn_lm.next_token(log_probs[index], keys[index])
                    searched[knn_rows] = gated.cpu().numpy()
                else:
                    mixed = memory.step(knn_rows, log_probs[index], keys[index])
                    searched[knn_rows] = memory.searched[knn_rows]
                log_probs[index] = mixed
            log_probs = log_probs.cpu()
            if seen is None and bool((penalty != 1).any()):  # the first step: the prompts
                seen = torch.zeros(log_probs.shape, dtype=torch.bool)
                held, column = mask.nonzero(as_tuple=True)  # the real (unpadded) positions
                seen[held, ids[held, column]] = True
            young = torch.from_numpy(active & (drawn < min_tokens))  # [b]
            shaped = penalize(log_probs, seen, penalty, young, lm.stop_ids)  # [b, V]
            came = np.full(b, -1, dtype=np.int64)  # the token each row drew (-1: none)
            top_values = top_ids = None
            if top_logprobs:  # [b, t], one topk for the whole batch
                top_values, top_ids = log_probs.topk(min(top_logprobs, log_probs.shape[-1]))
            step = torch.full((b, 1), lm.pad_id, dtype=torch.long)
            for row in np.flatnonzero(active):  # per row, not per token of the vocabulary
                try:
                    token = sample_next(shaped[row], sampling[row], generators[row])
                except Exception as exc:
                    if on_error is None:
                        raise
                    active[row] = False
                    on_error(int(row), exc)
                    continue
                out[row].append(token)
                step[row, 0] = came[row] = token
                drawn[row] += 1
                last = (
                    bool(token in stop and ends[row]) or drawn[row] >= sampling[row].max_new_tokens
                )
                go_on = True
                if on_token is not None:
                    top: tuple[tuple[int, float], ...] = ()
                    if top_ids is not None and top_values is not None:
                        top = tuple(
                            zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True)
                        )
                    followed = None
                    if memory is not None and memory.pointers is not None and wants_knn[row]:
                        followed = bool(memory.followed[row])
                    reported = Step(
                        token,
                        float(log_probs[row, token]),
                        top,
                        followed,
                        bool(searched[row]) if wants_knn[row] else None,
                        last,
                    )
                    go_on = on_token(int(row), reported) is not False
                if last or not go_on:
                    active[row] = False
            if seen is not None:  # what each row drew now counts as seen
                took = np.flatnonzero(came >= 0)
                seen[torch.from_numpy(took), torch.from_numpy(came[took])] = True
            if memory is not None:
                memory.advance(came)
            ids = step
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            position = position[:, -1:] + 1
    return out


def _read_prompts(
    knn_lm: KnnLM,
    memory: DecodeMemory,
    prompts: Sequence[np.ndarray],
    wants_knn: np.ndarray,
    keys: torch.Tensor,
    logits: torch.Tensor,
) -> None:
    """Feed the prompt positions of the rows that use the kNN-LM (bool [b] ``wants_knn``)
    into ``memory``, from the first forward's keys [b, width, dim] and logits [b, width, V]
    over the left-padded prompts. Position j < n - 1 of a prompt of n tokens sits in column
    width - n + j, and the prompt's token j + 1 came after it."""
    width = keys.shape[1]
    rows = [r for r in np.flatnonzero(wants_knn) if len(prompts[r]) > 1]
    if not rows:
        return
    lengths = np.array([len(prompts[r]) - 1 for r in rows])  # [r], positions with a target
    sequence = np.repeat(rows, lengths)  # [m]
    position = np.concatenate([np.arange(n) for n in lengths])  # [m]
    column = torch.from_numpy(width - 1 - np.repeat(lengths, lengths) + position)  # [m]
    at = torch.from_numpy(sequence).to(keys.device), column.to(keys.device)
    targets = np.concatenate([prompts[r][1:] for r in rows]).astype(np.int64)  # [m]
    lm_log_probs = None
    if knn_lm.pointer_min:  # the gate decides at each prompt position, as eval's does
        lm_log_probs = torch.log_softmax(logits[at].float(), dim=-1)  # [m, V]
    memory.read_prompts(
        sequence=sequence,
        position=position,
        keys=keys[at],
        targets=targets,
        lm_log_probs=lm_log_probs,
    )


class KnnLogitsProcessor(LogitsProcessor):
    """Interpolates ``knn_lm``'s retrieval into every step of ``knn_lm.lm.model.generate``.

    Use it as a context manager around ``generate``: it opens a key capture on the calling
    thread, which the LM's own hook fills with the newest position's key at each step.
    """

    def __init__(self, knn_lm: KnnLM) -> None:
        if knn_lm.uses_memory:
            raise ConfigError(
                "pointer following and the document cache need knnlm's own decode "
                "(knnlm generate, the service); KnnLogitsProcessor cannot see the prompt's "
                "positions: turn them off (pointer_min 0, cache_weight 0) to use it"
            )
        self.knn_lm = knn_lm
        self._context: AbstractContextManager[KeyCapture] | None = None
        self._capture: KeyCapture | None = None

    def __enter__(self) -> KnnLogitsProcessor:
        self._context = self.knn_lm.lm.capture_keys(last_only=True)
        self._capture = self._context.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._context is not None:
            self._context.__exit__(*exc_info)
        self._context = self._capture = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._capture is None:
            raise RuntimeError("use KnnLogitsProcessor as a context manager around generate()")
        keys = self._capture.pop()  # [b, dim]
        if keys.shape[0] != scores.shape[0]:
            raise RuntimeError(
                f"captured {keys.shape[0]} keys for {scores.shape[0]} rows of scores; "
                "beam search and other row-changing strategies are not supported"
            )
        lm_log_probs = torch.log_softmax(scores.float(), dim=-1)  # [b, V]
        return self.knn_lm.next_token_log_probs(lm_log_probs, keys).to(scores.dtype)
