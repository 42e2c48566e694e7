"""The kNN distribution and its interpolation with the LM, as pure tensor math.

No I/O and no Qdrant here. Shapes: ``b`` queries, ``k`` neighbours, ``V`` vocabulary.
A missing neighbour (fewer than k points in the store) has token id -1 and distance +inf
(NaN counts as missing too); a query without any neighbour gets p_kNN = 0 everywhere
(log = -inf), never NaN. Every row with a neighbour sums to 1 for any finite T > 0.

Example:
    >>> import torch
    >>> d2 = torch.tensor([[0.0, 1.0, float("inf")]])      # squared L2, [1, 3]
    >>> ids = torch.tensor([[5, 7, -1]])
    >>> p = knn_log_probs(d2, ids, vocab_size=8, temperature=1.0).exp()
    >>> round(p[0, 5].item(), 4), round(p[0, 7].item(), 4), p[0, 0].item()
    (0.7311, 0.2689, 0.0)
"""

from __future__ import annotations

import math

import torch

Temperature = float | torch.Tensor  # one T, or float [b]: one per query (row)


def row_temperatures(temperature: Temperature, sq_distances: torch.Tensor) -> float | torch.Tensor:
    """``temperature`` checked, ready to divide float [b, k] ``sq_distances`` by: the float
    itself, or a per-row tensor as float [b, 1] in the distances' dtype and device.

    Raises:
        ValueError: an entry that is not finite or not positive, or a tensor that is not
            one T per row ([b]).
    """
    if not isinstance(temperature, torch.Tensor):
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"`temperature` must be finite and positive, got {temperature}")
        return float(temperature)
    rows = sq_distances.shape[0]
    if temperature.shape != (rows,) or not temperature.is_floating_point():
        raise ValueError(
            f"a per-query `temperature` must be float [{rows}] (one T per row), got "
            f"{temperature.dtype} {tuple(temperature.shape)}"
        )
    bad = ~(torch.isfinite(temperature) & (temperature > 0))  # [b]; NaN fails both
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"`temperature` must be finite and positive, got {temperature[row].item()} in row {row}"
        )
    # [b] -> [b, 1]. Cast after the check: a float64 T below float32's range becomes 0 and
    # one above it inf, which the division below handles as the limits they stand for.
    return temperature.to(device=sq_distances.device, dtype=sq_distances.dtype)[:, None]


def neighbour_log_weights(sq_distances: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """log softmax_i(-d_i^2 / T) over each row's valid neighbours.

    Computed relative to each row's nearest neighbour (whose logit is exactly 0), so any
    finite T > 0 gives a normalised row: a tiny T puts all weight on the nearest, a huge T
    spreads it evenly, and nothing overflows to NaN.

    Args:
        sq_distances: float [b, k], squared L2 distances; +inf or NaN marks a missing
            neighbour.
        temperature: finite T > 0, or float [b] of them, one per row.

    Returns:
        float [b, k]; -inf for missing neighbours (and for every entry of an empty row).

    Example (a per-row T equals each row with its own scalar T):
        >>> d2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        >>> neighbour_log_weights(d2, torch.tensor([1.0, 0.5])).exp()
        tensor([[0.7311, 0.2689],
                [0.8808, 0.1192]])
    """
    t = row_temperatures(temperature, sq_distances)  # float, or [b, 1]
    d = sq_distances.masked_fill(torch.isnan(sq_distances), float("inf"))  # [b, k]; NaN = missing
    valid = torch.isfinite(d)  # [b, k]
    nearest = d.min(dim=-1, keepdim=True).values  # [b, 1]; +inf for empty rows
    shift = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
    # The nearest (and its ties) get exactly 0: a T below the dtype's smallest number rounds
    # to 0, and 0 / 0 would be NaN where the limit (all weight on the nearest) is meant.
    logits = torch.where(d == nearest, torch.zeros_like(d), (shift - d) / t)  # [b, k]
    logits = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [b, 1]; >= 0, or -inf if empty
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # avoid -inf - -inf
    return logits - lse


def knn_log_probs(
    sq_distances: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: Temperature,
) -> torch.Tensor:
    """log p_kNN over the whole vocabulary: neighbour weights scatter-added per token.

    Args:
        sq_distances: float [b, k], squared L2 (+inf = missing).
        token_ids: int64 [b, k], each neighbour's value (-1 = missing).
        vocab_size: V.
        temperature: softmax temperature T, or float [b]: one per query.

    Returns:
        float32 [b, V]; -inf for tokens no neighbour voted for.
    """
    if sq_distances.shape != token_ids.shape:
        raise ValueError(
            f"`sq_distances` {tuple(sq_distances.shape)} and `token_ids` "
            f"{tuple(token_ids.shape)} must have the same shape"
        )
    # a value outside the vocabulary (-1 = missing) counts as a missing neighbour
    outside = (token_ids < 0) | (token_ids >= vocab_size)  # [b, k]
    sq = sq_distances.float().masked_fill(outside, float("inf"))
    weights = neighbour_log_weights(sq, temperature).exp()  # [b, k]
    index = token_ids.clamp(0, vocab_size - 1)  # missing ids carry weight 0: any index will do
    probs = torch.zeros(
        (token_ids.shape[0], vocab_size), dtype=torch.float32, device=token_ids.device
    )
    probs.scatter_add_(1, index, weights)  # [b, V]
    return probs.log()


def knn_target_log_probs(
    sq_distances: torch.Tensor,
    token_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: Temperature,
) -> torch.Tensor:
    """log p_kNN(target) for one target per query, without building [b, V].

    Equals ``knn_log_probs(...).gather(1, targets[:, None])`` but costs O(b*k), and sums
    in log space, so tiny probabilities keep their precision.

    Args:
        sq_distances: float [b, k], squared L2 (+inf = missing).
        token_ids: int64 [b, k] (-1 = missing).
        targets: int64 [b].
        temperature: softmax temperature T, or float [b]: one per query.

    Returns:
        float32 [b]; -inf where no neighbour has the target as its value.
    """
    sq = sq_distances.float().masked_fill(token_ids < 0, float("inf"))  # -1 = missing
    log_w = neighbour_log_weights(sq, temperature)  # [b, k]
    hit = token_ids == targets[:, None]  # [b, k]
    return torch.logsumexp(log_w.masked_fill(~hit, float("-inf")), dim=-1)


def interpolate(
    lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor, lmbda: torch.Tensor | float
) -> torch.Tensor:
    """log(lambda * p_kNN + (1 - lambda) * p_LM), computed in log space.

    Args:
        lm_log_probs: float [b, ...], log p_LM.
        knn_log_probs: float, same shape, log p_kNN (-inf allowed).
        lmbda: a float in [0, 1], or float [b] for one lambda per query.

    Returns:
        float, the shape of ``lm_log_probs``.
    """
    lmbda_t = torch.as_tensor(lmbda, dtype=torch.float32, device=lm_log_probs.device)
    if not torch.all((lmbda_t >= 0) & (lmbda_t <= 1)):  # NaN fails both comparisons
        raise ValueError(f"`lmbda` must lie in [0, 1], got {lmbda}")
    # [b] -> [b, 1, ...] so a per-query lambda broadcasts over the vocabulary
    lmbda_t = lmbda_t.reshape(lmbda_t.shape + (1,) * (lm_log_probs.dim() - lmbda_t.dim()))
    return torch.logaddexp(torch.log1p(-lmbda_t) + lm_log_probs, torch.log(lmbda_t) + knn_log_probs)
