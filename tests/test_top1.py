"""Top-1 next-token accuracy in eval, against numpy: the share of positions where the argmax
of the LM's, and of the kNN-LM's whole mixed distribution, is the token that came. The
reference takes keys and logits straight from transformers, searches by brute force and
mixes in float64 (as tests/test_perplexity.py does for perplexity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnLM, load_language_model, open_store
from knn_store.doc_cache import DocumentCache
from knn_store.lambdas import FixedLambda
from knn_store.store.config import SearchOptions
from tests.reference import brute_force_knn, interpolated_log_prob, knn_probs
from tests.test_perplexity import HELD_OUT, _reference_keys

K, T = 12, 3.0


def _reference_top1(lm, train_docs, held_out_ids, *, lmbda: float) -> tuple[int, int]:
    """Positions where the LM's and the kNN-LM's argmax is the target (counts)."""
    keys, values = [], []
    for ids in train_docs:
        doc_keys, _ = _reference_keys(lm, ids)
        keys.append(doc_keys[:-1])  # position p predicts token p+1
        values.append(ids[1:])
    keys_all, values_all = np.concatenate(keys), np.concatenate(values)
    q_keys, q_logp = _reference_keys(lm, held_out_ids)
    queries, lm_logp = q_keys[:-1], q_logp[:-1]  # [n, d], [n, V]
    targets = held_out_ids[1:]
    idx, d2 = brute_force_knn(keys_all, queries, K)
    p_knn = knn_probs(d2, values_all[idx], lm.vocab_size, T)  # [n, V]
    mixed = interpolated_log_prob(np.exp(lm_logp), p_knn, np.full(len(targets), lmbda))
    base = int((lm_logp.argmax(-1) == targets).sum())
    knn = int((mixed.argmax(-1) == targets).sum())
    return base, knn


@pytest.mark.parametrize("backend", ["edge", "local"])
def test_eval_top1_matches_numpy(
    tiny_models, corpus_dir: Path, settings_factory, backend: str
) -> None:
    settings = settings_factory(tiny_models["gpt2"], backend=backend, window=128, stride=64)
    lm = load_language_model(settings)
    docs = list(read_corpus([corpus_dir], glob="**/*.txt"))
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="code", window=128, stride=64).run(docs)
    knn_lm = KnnLM(
        lm,
        store,
        k=K,
        temperature=T,
        policy=FixedLambda(0.6),
        search=SearchOptions(exact=True),
        window=128,
        stride=64,
        batch_size=2,
    )
    stored = lm.encode(docs[0].text)  # a stored text: retrieval changes the argmax
    texts = [lm.encode(HELD_OUT), stored]
    result = knn_lm.evaluate(texts)
    unique = list({d.text: lm.encode(d.text) for d in docs}.values())
    base = knn = 0
    for ids in texts:
        b, k = _reference_top1(lm, unique, ids, lmbda=0.6)
        base, knn = base + b, knn + k
    assert (result.base_correct, result.knn_correct) == (base, knn)
    assert result.knn_top1 == knn / result.tokens and result.base_top1 == base / result.tokens
    assert result.knn_correct > result.base_correct  # the memory made a difference

    # lambda 0 is the LM alone: the same argmax everywhere
    alone = knn_lm.with_options(policy=FixedLambda(0.0)).evaluate(texts)
    assert alone.knn_correct == alone.base_correct == base

    # score(top1=True) keeps no [m, V] tensor past the batch, and changes no log-prob
    plain = list(knn_lm.score(texts))
    marked = list(knn_lm.score(texts, top1=True))
    for a, b in zip(plain, marked, strict=True):
        assert a.correct is None and a.lm_correct is None
        assert b.correct is not None and b.lm_correct is not None
        assert b.lm.lm_log_probs is None and b.log_probs is None
        assert bool((a.log_prob == b.log_prob).all())
    # with full distributions, the flags are their argmax
    for s in knn_lm.score(texts, full=True, top1=True):
        assert s.log_probs is not None and s.correct is not None
        assert bool((s.correct == (s.log_probs.argmax(-1) == s.lm.targets)).all())
    store.close()


def test_eval_top1_counts_the_document_cache(
    tiny_models, corpus_dir: Path, settings_factory
) -> None:
    """With the cache on, top-1 is the argmax of the distribution the cache mixed into."""
    settings = settings_factory(tiny_models["gpt2"], window=16, stride=8)
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="code", window=16, stride=8).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    args = dict(k=8, temperature=2.0, policy=FixedLambda(0.3), window=16, stride=8)
    cached = KnnLM(lm, store, cache=DocumentCache(temperature=1.0, weight=0.9), **args)
    text = [lm.encode(HELD_OUT * 3)]  # it repeats itself: the cache knows what comes
    got = cached.evaluate(text)
    full = list(cached.score(text, full=True))
    want = sum(int((s.log_probs.argmax(-1) == s.lm.targets).sum()) for s in full)  # type: ignore[union-attr]
    assert got.knn_correct == want
    assert got.knn_correct != KnnLM(lm, store, **args).evaluate(text).knn_correct
    store.close()
