"""vLLM's sampling parameters in knnlm's decoding (``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``), checked against transformers' own logits processors and a
numpy reference for vLLM's order, then through ``decode`` with a tiny model: greedy steps
against eval's distribution put through the reference processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from knn_store import ConfigError, KnnLM
from knn_store.generation import Sampling, decode, penalize, sampling_probs
from knnlm.service.detokenize import ChoiceText
from tests.test_generation import PROMPT, _eval_distribution, _knn_lm, setup  # noqa: F401


def _log_probs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=generator) * 3, dim=-1)


def _numpy_vllm(
    log_probs: np.ndarray, temperature: float, min_p: float, top_k: int, top_p: float
) -> np.ndarray:
    """vLLM's order, written plainly: temperature, min_p, top_k, top_p, over float64."""
    logits = log_probs.astype(np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()
    if top_k:
        keep &= probs >= np.sort(probs[keep])[::-1][min(top_k, keep.sum()) - 1]
    probs = np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of the likelier tokens
        dropped = order[(before >= top_p) & (np.arange(len(order)) > 0)]
        probs[dropped] = 0.0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize(
    ("temperature", "min_p", "top_k"), [(1.0, 0.1, 0), (0.7, 0.05, 40), (2.5, 0.3, 5)]
)
def test_min_p_equals_transformers_warpers(temperature: float, min_p: float, top_k: int) -> None:
    """min_p and top_k are both masks relative to the likeliest token, so transformers'
    order (top_k before min_p) and vLLM's (min_p first) agree without top_p."""
    log_probs = _log_probs(4, 300, seed=1)
    warpers = [TemperatureLogitsWarper(temperature), MinPLogitsWarper(min_p)]
    if top_k:
        warpers.insert(1, TopKLogitsWarper(top_k))
    ids = torch.zeros((4, 1), dtype=torch.long)
    reference = log_probs.clone()
    for warper in warpers:
        reference = warper(ids, reference)
    sampling = Sampling(temperature=temperature, min_p=min_p, top_k=top_k)
    for row in range(4):
        got = sampling_probs(log_probs[row], sampling)
        assert got is not None
        expected = reference[row].double().softmax(-1)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert (got > 0).sum() < 300  # min_p did drop tokens


@pytest.mark.parametrize(
    ("temperature", "min_p", "top_k", "top_p"),
    [(1.0, 0.02, 0, 0.8), (0.5, 0.1, 12, 0.6), (1.7, 0.0, 0, 0.95), (1.0, 1.0, 0, 1.0)],
)
def test_the_sampling_order_is_vllms(
    temperature: float, min_p: float, top_k: int, top_p: float
) -> None:
    log_probs = _log_probs(3, 200, seed=2)
    sampling = Sampling(temperature=temperature, min_p=min_p, top_k=top_k, top_p=top_p)
    for row in range(3):
        got = sampling_probs(log_probs[row], sampling)
        assert got is not None
        expected = _numpy_vllm(log_probs[row].numpy(), temperature, min_p, top_k, top_p)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    log_probs = _log_probs(3, 50, seed=3)
    history = torch.tensor([[1, 4, 4, 9], [0, 0, 0, 0], [49, 7, 3, 1]])  # [b, t]
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen.scatter_(1, history, True)
    got = penalize(log_probs, seen, torch.full((3,), penalty), torch.zeros(3, dtype=bool), [])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, log_probs.clone())
    torch.testing.assert_close(got, expected)
    # on logits, where some are > 0, the same rule as transformers (divide those)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 4
    got = penalize(logits, seen, torch.full((3,), penalty), torch.zeros(3, dtype=bool), [])
    torch.testing.assert_close(got, RepetitionPenaltyLogitsProcessor(penalty)(history, logits))


def test_min_tokens_masks_end_tokens_as_transformers_does() -> None:
    log_probs = _log_probs(2, 30, seed=5)
    ends = [3, 17]
    young = torch.tensor([True, False])
    got = penalize(log_probs, None, torch.ones(2), young, ends)
    # transformers' processor, for a row with no new token yet (prompt of length 4)
    reference = MinNewTokensLengthLogitsProcessor(4, 2, ends)(
        torch.zeros((1, 4), dtype=torch.long), log_probs[:1].clone()
    )
    torch.testing.assert_close(got[0], reference[0])
    torch.testing.assert_close(got[1], log_probs[1])  # a grown row is left as it is
    assert torch.equal(log_probs, _log_probs(2, 30, seed=5))  # the input is not changed


@pytest.mark.parametrize(
    "bad",
    [
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"min_tokens": 5, "max_new_tokens": 4},
        {"min_tokens": -1},
    ],
)
def test_out_of_range_sampling_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        Sampling(**bad)


def test_stop_strings_wait_for_min_tokens() -> None:
    """As vLLM's: a stop string counts only where it ends in token ``min_tokens`` or later."""

    def decode_ids(ids) -> str:
        return "".join(chr(i) for i in ids)

    def run(min_tokens: int) -> ChoiceText:
        text = ChoiceText(decode_ids, decode_one=chr, stops=("ab",), min_tokens=min_tokens)
        for c in "abxab!":
            if not text.add(ord(c), -1.0):
                break
        return text

    assert run(0).text == "" and run(0).stop_reason == "ab"
    assert run(2).text == ""  # "ab" ends in token 2
    assert run(3).text == "abx" and len(run(3).tokens) == 5  # the first "ab" is too soon
    assert run(6).stop_reason is None and run(6).text == "abxab!"


# --- through decode, with a tiny model ------------------------------------------------------


@pytest.fixture
def knn_lm(setup) -> KnnLM:  # noqa: F811 (setup: the imported fixture)
    """test_generation's kNN-LM: fixed lambda 0.4, k = 8, T = 2, exact search."""
    return _knn_lm(*setup)


def test_greedy_with_a_repetition_penalty_follows_the_reference(knn_lm: KnnLM) -> None:
    """Each greedy step is the argmax of eval's distribution after transformers' penalty
    over the prompt and the tokens so far; a strong penalty never repeats a token."""
    prompt = knn_lm.lm.encode(PROMPT)
    for penalty in (1.5, 50.0):
        sampling = Sampling(temperature=0, max_new_tokens=8, repetition_penalty=penalty)
        (new,) = decode(knn_lm, [prompt], [sampling])
        ids = prompt
        for token in new:
            dist = _eval_distribution(knn_lm, ids)
            history = torch.from_numpy(ids)[None]
            reference = RepetitionPenaltyLogitsProcessor(penalty)(history, dist[None].clone())
            assert token == int(reference.argmax())
            ids = np.append(ids, token)
        if penalty == 50.0:
            assert not set(new) & set(prompt.tolist()) and len(set(new)) == len(new)
    plain = decode(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=8)])[0]
    assert plain != decode(knn_lm, [prompt], [sampling])[0]  # the penalty changed the text


def test_a_penalty_in_one_row_leaves_the_others(knn_lm: KnnLM) -> None:
    prompts = [knn_lm.lm.encode(PROMPT), knn_lm.lm.encode("x = 1")]
    plain = Sampling(temperature=0.9, seed=3, max_new_tokens=6)
    alone = decode(knn_lm, prompts[1:], [plain])[0]
    penalized = Sampling(temperature=0.9, seed=3, max_new_tokens=6, repetition_penalty=3.0)
    together = decode(knn_lm, prompts, [penalized, plain])
    assert together[1] == alone


def test_min_tokens_and_ignore_eos_hold_back_and_pass_an_end_token(
    knn_lm: KnnLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the greedy first token an end-of-text token: plain decoding ends at once,
    min_tokens draws the next likeliest instead, ignore_eos goes on past it."""
    lm = knn_lm.lm
    prompt = lm.encode(PROMPT)
    first = decode(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=1)])[0][0]
    monkeypatch.setitem(lm.__dict__, "stop_ids", (first,))
    assert decode(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=5)])[0] == [first]

    held = decode(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=5, min_tokens=1)])[0]
    dist = _eval_distribution(knn_lm, prompt)
    dist[first] = float("-inf")
    assert held[0] == int(dist.argmax()) and len(held) >= 1

    sampled = [
        Sampling(temperature=1.5, seed=seed, max_new_tokens=4, min_tokens=4) for seed in range(6)
    ]
    for new in decode(knn_lm, [prompt] * 6, sampled):
        assert len(new) == 4 and first not in new

    passed = decode(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=5, ignore_eos=True)])
    assert passed[0][0] == first and len(passed[0]) == 5
