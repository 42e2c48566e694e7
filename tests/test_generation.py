"""Generation through transformers' ``generate`` gives eval's distribution, step by step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnLM, load_language_model, open_store
from knn_store.generation import KnnLogitsProcessor
from knn_store.lambdas import FEATURES, BucketLambda, FixedLambda, LearnedLambda
from knn_store.perplexity import score_windows
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
    IngestWorker(lm, store, domain="code", window=64, stride=32, progress=False).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    yield lm, store
    store.close()


def _eval_log_prob(lm, knn_lm: KnnLM, ids: np.ndarray) -> float:
    """What eval scores for the last token of ``ids`` given everything before it."""
    scored = score_windows(lm, [(ids, Window(start=0, end=len(ids), first=len(ids) - 2))])
    features = knn_lm.features(
        knn_lm.neighbours(scored.keys),
        lm_entropy=scored.lm_entropy,
        lm_max_log_prob=scored.lm_max_log_prob,
    )
    return float(knn_lm.target_log_probs(scored.lm_target_log_probs, features, scored.targets))


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_generation_distribution_equals_eval_at_each_position(setup, policy) -> None:
    lm, store = setup
    knn_lm = KnnLM(store, k=8, temperature=2.0, lambda_policy=policy, exact=True)
    prompt = lm.encode(PROMPT)
    with KnnLogitsProcessor(lm, knn_lm) as knn:
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
        assert float(log_probs[chosen]) == pytest.approx(_eval_log_prob(lm, knn_lm, ids), abs=1e-4)
        # the whole distribution, not only the chosen token, is eval's
        keys = lm.forward(ids[None, :-1], with_logits=True)
        lm_lp = torch.log_softmax(keys.logits[0, -1:].float(), -1)
        full = knn_lm.next_token_log_probs(lm_lp, knn_lm.neighbours(keys.keys[0, -1:]))[0]
        torch.testing.assert_close(log_probs.exp(), full.exp(), atol=1e-5, rtol=1e-4)


def test_processor_changes_the_distribution_and_cleans_up(setup) -> None:
    lm, store = setup
    knn_lm = KnnLM(store, k=8, temperature=1.0, lambda_policy=FixedLambda(0.9), exact=True)
    prompt = torch.from_numpy(lm.encode(PROMPT))[None]
    hooks_before = len(lm.key_module._forward_pre_hooks)
    with KnnLogitsProcessor(lm, knn_lm) as knn:
        assert len(lm.key_module._forward_pre_hooks) == hooks_before + 1
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
    knn_lm = KnnLM(store, k=8, temperature=1.0, lambda_policy=FixedLambda(0.5))
    with KnnLogitsProcessor(lm, knn_lm) as knn, pytest.raises(RuntimeError, match="generate"):
        knn(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, lm.vocab_size))
