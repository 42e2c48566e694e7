"""Generation (transformers' ``generate`` with the processor, and knnlm's own batched
``decode``) gives eval's distribution, step by step; the retrieval gate's skip path is
exactly the LM."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnLM, load_language_model, open_store
from knn_store.gate import RetrievalGate
from knn_store.generation import KnnLogitsProcessor, Sampling, decode
from knn_store.lambdas import FEATURES, BucketLambda, FixedLambda, LearnedLambda
from knn_store.store.config import SearchOptions
from knn_store.windows import Window

PROMPT = "def add(a, b):\n    return"

POLICIES = [
    FixedLambda(0.4),
    BucketLambda("cosine", [0.5], [0.2, 0.8]),
    LearnedLambda(list(FEATURES), [0.0] * 5, [1.0] * 5, [([[0.2, 0.5, -0.1, 0.3, 0.4]], [0.0])]),
]


@pytest.fixture
def setup(tiny_model: Path, corpus_dir: Path, settings_factory):
    settings = settings_factory(tiny_model, window=64, stride=32)
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="code", window=64, stride=32).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    yield lm, store
    store.close()


def _knn_lm(lm, store, policy=None, **kwargs) -> KnnLM:
    args = {"k": 8, "temperature": 2.0, "search": SearchOptions(exact=True)}
    args.update(kwargs)
    return KnnLM(lm, store, policy=policy or FixedLambda(0.4), window=64, stride=32, **args)


def _eval_log_prob(knn_lm: KnnLM, ids: np.ndarray) -> float:
    """What eval scores for the last token of ``ids`` given everything before it."""
    view = knn_lm.lm_view([(0, ids, Window(start=0, end=len(ids), first=len(ids) - 2))])
    return float(knn_lm.finish(view).log_prob[0])


def _eval_distribution(knn_lm: KnnLM, ids: np.ndarray) -> torch.Tensor:
    """Eval's full distribution of the token after ``ids``, float [V]."""
    ids = np.append(ids, 0)  # a dummy target: the distribution does not depend on it
    view = knn_lm.lm_view([(0, ids, Window(start=0, end=len(ids), first=len(ids) - 2))], full=True)
    scored = knn_lm.finish(view, full=True)
    assert scored.log_probs is not None
    return scored.log_probs[0]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_generation_distribution_equals_eval_at_each_position(setup, policy) -> None:
    lm, store = setup
    knn_lm = _knn_lm(lm, store, policy)
    prompt = lm.encode(PROMPT)
    with KnnLogitsProcessor(knn_lm) as knn:
        out = lm.model.generate(
            torch.from_numpy(prompt)[None],
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
            logits_processor=LogitsProcessorList([knn]),
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=lm.pad_id,
        )
    tokens = out.sequences[0].numpy()
    for step, scores in enumerate(out.scores):  # step 0 is the prompt; later steps use the cache
        log_probs = scores[0]
        torch.testing.assert_close(log_probs.exp().sum(), torch.tensor(1.0))
        ids = tokens[: len(prompt) + step + 1]
        chosen = int(ids[-1])
        assert chosen == int(log_probs.argmax())  # greedy picked from the kNN-LM's scores
        assert float(log_probs[chosen]) == pytest.approx(_eval_log_prob(knn_lm, ids), abs=1e-4)
        # the whole distribution, not only the chosen token, is eval's
        full = _eval_distribution(knn_lm, ids[:-1])
        torch.testing.assert_close(log_probs.exp(), full.exp(), atol=1e-5, rtol=1e-4)


def test_decode_greedy_follows_evals_distribution(setup) -> None:
    lm, store = setup
    knn_lm = _knn_lm(lm, store, POLICIES[2])
    prompt = lm.encode(PROMPT)
    (new,) = decode(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=4)])
    ids = prompt
    for token in new:
        dist = _eval_distribution(knn_lm, ids)
        assert token == int(dist.argmax())
        ids = np.append(ids, token)


def test_decode_batches_equal_single_requests(setup) -> None:
    """Rows of one batch (left-padded, different lengths and seeds) decode as they would
    alone: what the service relies on when it batches concurrent requests."""
    lm, store = setup
    knn_lm = _knn_lm(lm, store)
    prompts = [lm.encode(PROMPT), lm.encode("for i in"), lm.encode("x")]
    sampling = [
        Sampling(temperature=0.0, max_new_tokens=5),
        Sampling(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=4),
        Sampling(temperature=1.0, top_k=5, seed=11, max_new_tokens=6, knn=False),
    ]
    together = decode(knn_lm, prompts, sampling)
    alone = [decode(knn_lm, [p], [s])[0] for p, s in zip(prompts, sampling, strict=True)]
    assert together == alone
    assert [len(t) for t in together] == [5, 4, 6] or any(t[-1] in lm.stop_ids for t in together)


def test_decode_seed_repeats_and_refuses_too_long(setup) -> None:
    lm, store = setup
    knn_lm = _knn_lm(lm, store)
    prompt = lm.encode(PROMPT)
    sampling = Sampling(temperature=1.0, seed=7, max_new_tokens=6)
    assert decode(knn_lm, [prompt], [sampling]) == decode(knn_lm, [prompt], [sampling])
    from knn_store.errors import ConfigError

    with pytest.raises(ConfigError, match="context"):
        decode(knn_lm, [prompt], [Sampling(max_new_tokens=lm.max_positions)])


def test_gate_skip_gives_exactly_the_lms_distribution(setup) -> None:
    """Where the gate says skip, no search runs and the distribution is the LM's, bit for bit;
    where it says search, it is the ungated kNN-LM's."""
    lm, store = setup
    never = RetrievalGate([0.0, 0.0], [1.0, 1.0], [0.0, 0.0], -50.0, threshold=0.5)
    always = RetrievalGate([0.0, 0.0], [1.0, 1.0], [0.0, 0.0], 50.0, threshold=0.5)
    ids = lm.encode(PROMPT)
    out = lm.forward(ids[None], with_logits=True)
    assert out.logits is not None
    lm_lp = torch.log_softmax(out.logits[0].float(), -1)  # [t, V]
    keys = out.keys[0]
    skipped = _knn_lm(lm, store, FixedLambda(0.9), gate=never)
    assert torch.equal(skipped.next_token_log_probs(lm_lp, keys), lm_lp)
    searched = _knn_lm(lm, store, FixedLambda(0.9), gate=always)
    plain = _knn_lm(lm, store, FixedLambda(0.9))
    torch.testing.assert_close(
        searched.next_token_log_probs(lm_lp, keys), plain.next_token_log_probs(lm_lp, keys)
    )
    # in the eval pipeline: skipped positions have lambda 0 and the LM's log-probability
    scored = next(skipped.score([ids]))
    assert not scored.searched.any() and (scored.lmbda == 0).all()
    assert torch.equal(scored.log_prob, scored.lm.lm_target_log_prob)
    result = skipped.evaluate([ids])
    assert result.queries == 0 and result.knn_perplexity == result.base_perplexity


def test_processor_changes_the_distribution_and_adds_no_hook(setup) -> None:
    lm, store = setup
    knn_lm = _knn_lm(lm, store, FixedLambda(0.9), temperature=1.0)
    prompt = torch.from_numpy(lm.encode(PROMPT))[None]
    hooks_before = len(lm.key_module._forward_pre_hooks)
    assert hooks_before == 1  # the LM's own, registered once
    with KnnLogitsProcessor(knn_lm) as knn:
        scores = lm.model.generate(
            prompt,
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([knn]),
            pad_token_id=lm.pad_id,
        ).scores[0]
    assert len(lm.key_module._forward_pre_hooks) == hooks_before
    plain = lm.model.generate(
        prompt,
        max_new_tokens=1,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=lm.pad_id,
    ).scores[0]
    assert not torch.allclose(torch.log_softmax(plain, -1), scores, atol=1e-3)


def test_processor_outside_generate_says_so(setup) -> None:
    lm, store = setup
    knn = KnnLogitsProcessor(_knn_lm(lm, store))
    with pytest.raises(RuntimeError, match="context manager"):
        knn(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, lm.vocab_size))
    with knn, pytest.raises(RuntimeError, match="no key captured"):
        knn(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, lm.vocab_size))


def test_concurrent_forwards_never_see_each_others_keys(setup) -> None:
    """Threads forwarding at once through one model each get their own keys."""
    lm, _ = setup
    texts = [PROMPT, "for i in range(10):", "import os", "class Stack:"]
    expected = {t: lm.forward(lm.encode(t)[None], with_logits=False).keys for t in texts}
    errors: list[str] = []

    def run(text: str) -> None:
        for _ in range(20):
            got = lm.forward(lm.encode(text)[None], with_logits=True).keys
            if got.shape != expected[text].shape or not torch.allclose(got, expected[text]):
                errors.append(text)

    threads = [threading.Thread(target=run, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
