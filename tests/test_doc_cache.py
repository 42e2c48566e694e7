"""The document cache against numpy: each position's cache distribution equals a full kNN
computed by brute force over the same text's earlier keys, across batches and texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnLM, load_language_model, open_store
from knn_store.doc_cache import CacheState, DocumentCache
from knn_store.lambdas import FixedLambda
from knn_store.store.config import SearchOptions
from tests.reference import knn_probs

VOCAB = 6


def _reference(keys: np.ndarray, values: np.ndarray, *, size: int, t: float) -> np.ndarray:
    """p_cache [n, V] of one text: position i over positions max(0, i - size) .. i - 1."""
    out = np.zeros((len(keys), VOCAB))
    for i in range(len(keys)):
        lo = max(0, i - size)
        if i == lo:
            continue
        d2 = ((keys[lo:i].astype(np.float64) - keys[i]) ** 2).sum(-1)
        out[i] = knn_probs(d2[None], values[lo:i][None], VOCAB, t)[0]
    return out


@pytest.mark.parametrize("size", [3, 100])
def test_cache_equals_a_full_knn_over_the_texts_earlier_keys(size: int) -> None:
    rng = np.random.default_rng(0)
    lengths = {0: 17, 1: 11}
    keys = {s: rng.standard_normal((n, 4)).astype(np.float32) for s, n in lengths.items()}
    values = {s: rng.integers(0, VOCAB, n) for s, n in lengths.items()}
    cache = DocumentCache(temperature=1.5, weight=0.3, size=size)
    state = CacheState()
    got = {s: np.zeros((n, VOCAB)) for s, n in lengths.items()}
    got_target = {s: np.zeros(n) for s, n in lengths.items()}
    # two batches, each holding a stretch of both texts, rows interleaved
    for lo, hi in ((0, 6), (6, 17)):
        rows = [(s, p) for p in range(lo, hi) for s in lengths if p < lengths[s]]
        seq = np.array([s for s, _ in rows])
        pos = np.array([p for _, p in rows])
        scores = cache.target_log_probs(
            state,
            sequence=seq,
            position=pos + 1,  # absolute positions: BOS is 0
            keys=torch.from_numpy(np.stack([keys[s][p] for s, p in rows])),
            targets=torch.tensor([values[s][p] for s, p in rows]),
            vocab_size=VOCAB,
            full=True,
        )
        assert scores.log_probs is not None
        for r, (s, p) in enumerate(rows):
            got[s][p] = scores.log_probs[r].exp().numpy()
            got_target[s][p] = scores.target_log_prob[r].exp().item()
            assert bool(scores.has_memory[r]) == (p > 0)
    for s in lengths:
        ref = _reference(keys[s], values[s], size=size, t=1.5)
        np.testing.assert_allclose(got[s], ref, atol=1e-5)
        np.testing.assert_allclose(got_target[s], ref[np.arange(lengths[s]), values[s]], atol=1e-5)


def test_a_gap_in_positions_starts_the_cache_afresh() -> None:
    cache = DocumentCache(temperature=1.0, weight=0.5)
    state = CacheState()
    one = torch.zeros((2, 3))
    cache.target_log_probs(
        state,
        sequence=[0, 0],
        position=[1, 2],
        keys=one,
        targets=torch.tensor([1, 1]),
        vocab_size=4,
    )
    later = cache.target_log_probs(
        state, sequence=[0], position=[9], keys=one[:1], targets=torch.tensor([1]), vocab_size=4
    )
    assert not later.has_memory.any()


def test_mix_keeps_rows_without_memory_and_weighs_the_rest() -> None:
    cache = DocumentCache(temperature=1.0, weight=0.25)
    lp = torch.log(torch.tensor([0.5, 0.5]))
    cached = torch.log(torch.tensor([1.0, 0.0]))
    out = cache.mix(lp, cached, torch.tensor([False, True])).exp()
    assert out.tolist() == pytest.approx([0.5, 0.75 * 0.5])
    with pytest.raises(ValueError, match="weight"):
        DocumentCache(temperature=1.0, weight=1.5)


def test_eval_with_the_cache_mixes_it_into_every_position(
    tiny_models, corpus_dir: Path, settings_factory
) -> None:
    settings = settings_factory(tiny_models["llama"], exact=True)
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    docs = list(read_corpus([corpus_dir], glob="**/*.txt"))
    IngestWorker(lm, store, domain="code", window=16, stride=8).run(docs)
    args = dict(
        k=8,
        temperature=3.0,
        policy=FixedLambda(0.4),
        search=SearchOptions(exact=True),
        window=16,
        stride=8,
        batch_size=2,
    )
    texts = [lm.encode("def add(a, b):\n    return a + b\n" * 3), lm.encode("for i in x:\n" * 4)]
    plain = list(KnnLM(lm, store, **args).score(texts))
    off = list(
        KnnLM(lm, store, cache=DocumentCache(temperature=2.0, weight=0.0), **args).score(texts)
    )
    for a, b in zip(plain, off, strict=True):  # weight 0: the same numbers, to the bit
        assert torch.equal(a.log_prob, b.log_prob)
    w, t = 0.3, 2.0
    on = list(KnnLM(lm, store, cache=DocumentCache(temperature=t, weight=w), **args).score(texts))
    for s in range(len(texts)):
        rows = [(i, j) for i, sc in enumerate(plain) for j in np.flatnonzero(sc.lm.sequence == s)]
        rows.sort(key=lambda r: int(plain[r[0]].lm.position[r[1]]))
        keys = np.stack([plain[i].lm.keys[j].double().numpy() for i, j in rows])
        values = np.array([int(plain[i].lm.targets[j]) for i, j in rows])
        base = np.array([plain[i].log_prob[j].exp().item() for i, j in rows])
        got = np.array([on[i].log_prob[j].exp().item() for i, j in rows])
        p_cache = np.zeros(len(rows))
        for n in range(1, len(rows)):  # every earlier position of the same text
            d2 = ((keys[:n] - keys[n]) ** 2).sum(-1)
            logits = -d2 / t
            weights = np.exp(logits - logits.max())
            p_cache[n] = weights[values[:n] == values[n]].sum() / weights.sum()
        ref = np.where(np.arange(len(rows)) > 0, (1 - w) * base + w * p_cache, base)
        np.testing.assert_allclose(got, ref, rtol=1e-4)
        assert (p_cache[1:] > 0).any()  # the texts repeat themselves: the cache mattered
    store.close()
