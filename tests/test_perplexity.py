"""Ingest + eval against an independent numpy recomputation of every number.

The reference takes keys straight from transformers (hidden states, or a hook placed by hand),
searches them by brute force, and interpolates in float64. With windows longer than every
document, both sides see the same contexts, so perplexities must agree to 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.corpus import Document, read_corpus
from ingest.worker import IngestWorker
from knn_store import KnnLM, load_language_model, open_store
from knn_store.lambdas import BucketLambda, FixedLambda
from knn_store.store.config import SearchOptions
from tests.reference import brute_force_knn, interpolated_log_prob, knn_probs, log_softmax
from tests.test_lm import _post_attention_norm

HELD_OUT = "def add(x, y):\n    return x + y\nfor i in range(3):\n    print(i * i)\n"


def _reference_keys(lm, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 keys [n, d] and log-probs [n, V] of one whole sequence, straight from HF."""
    seen: list[torch.Tensor] = []
    handle = _post_attention_norm(lm.model).register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            out = lm.model(torch.from_numpy(ids[None]), output_hidden_states=True)
    finally:
        handle.remove()
    keys = out.hidden_states[-1] if lm.key_type == "final" else seen[-1]
    return keys[0].double().numpy(), log_softmax(out.logits[0].numpy())


def _reference_perplexities(lm, train_docs, held_out_ids, *, k, lmbda, temperature):
    """``lmbda``: a float, or a function of the nearest squared distances [n] -> [n]."""
    keys, values = [], []
    for ids in train_docs:
        doc_keys, _ = _reference_keys(lm, ids)
        keys.append(doc_keys[:-1])  # position p predicts token p+1
        values.append(ids[1:])
    keys_all, values_all = np.concatenate(keys), np.concatenate(values)
    q_keys, q_logp = _reference_keys(lm, held_out_ids)
    queries, lm_logp = q_keys[:-1], q_logp[:-1]
    targets = held_out_ids[1:]
    idx, d2 = brute_force_knn(keys_all, queries, k)
    p_knn = knn_probs(d2, values_all[idx], lm.vocab_size, temperature)
    lam = lmbda(d2[:, 0]) if callable(lmbda) else np.full(len(targets), lmbda)
    logp = interpolated_log_prob(np.exp(lm_logp), p_knn, lam)
    rows = np.arange(len(targets))
    base = math.exp(-lm_logp[rows, targets].mean())
    knn = math.exp(-logp[rows, targets].mean())
    return base, knn


EXACT = SearchOptions(exact=True)


@pytest.mark.parametrize("backend", ["edge", "local"])
@pytest.mark.parametrize("key_type", ["final", "ffn_input"])
def test_eval_matches_brute_force_reference(
    tiny_model: Path,
    corpus_dir: Path,
    settings_factory,
    tmp_path: Path,
    backend: str,
    key_type: str,
) -> None:
    settings = settings_factory(
        tiny_model,
        key_type=key_type,
        backend=backend,
        window=128,
        stride=64,
        top_k=12,
        temperature=3.0,
        lmbda=0.4,
        exact=True,
    )
    lm = load_language_model(settings)
    docs = list(read_corpus([corpus_dir], glob="**/*.txt"))
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="code", window=128, stride=64).run(docs)

    knn_lm = KnnLM(
        lm,
        store,
        k=12,
        temperature=3.0,
        policy=FixedLambda(0.4),
        search=EXACT,
        window=128,
        stride=64,
    )
    held_out = lm.encode(HELD_OUT)
    result = knn_lm.evaluate([held_out])
    store.close()

    unique = {d.text: lm.encode(d.text) for d in docs}  # identical texts are stored once
    base, knn = _reference_perplexities(
        lm, list(unique.values()), held_out, k=12, lmbda=0.4, temperature=3.0
    )
    assert result.tokens == len(held_out) - 1
    assert result.base_perplexity == pytest.approx(base, rel=1e-4)
    assert result.knn_perplexity == pytest.approx(knn, rel=1e-4)
    assert result.knn_perplexity != pytest.approx(
        result.base_perplexity, rel=1e-3
    )  # retrieval mattered


def test_eval_with_bucketed_lambda_matches_reference(
    tiny_models, corpus_dir: Path, settings_factory
) -> None:
    """Adaptive lambda: each token's lambda from its nearest distance, as numpy computes it."""
    settings = settings_factory(tiny_models["llama"], window=128, stride=64, exact=True)
    lm = load_language_model(settings)
    docs = list(read_corpus([corpus_dir], glob="**/*.txt"))
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="code", window=128, stride=64).run(docs)
    held_out = lm.encode(HELD_OUT)
    probe = KnnLM(
        lm,
        store,
        k=12,
        temperature=2.0,
        policy=FixedLambda(0.5),
        search=EXACT,
        window=128,
        stride=64,
    )
    keys = lm.forward(held_out[None], with_logits=False).keys[0, :-1]
    d_min = probe.neighbours(keys).sq_distances[:, 0]
    # four populated buckets, with edges midway between distances so that float32 (store)
    # and float64 (reference) rounding cannot put a token in different buckets
    distinct = np.unique(d_min)
    edges = [float(distinct[i - 1] + distinct[i]) / 2 for i in np.arange(1, 4) * len(distinct) // 4]
    lambdas = [0.9, 0.6, 0.3, 0.05]
    policy = BucketLambda("d_min", edges, lambdas)
    knn_lm = probe.with_options(policy=policy)
    result = knn_lm.evaluate([held_out])
    store.close()

    def reference_lambda(nearest: np.ndarray) -> np.ndarray:
        return np.asarray(lambdas)[np.searchsorted(edges, nearest, side="right")]

    unique = {d.text: lm.encode(d.text) for d in docs}
    base, knn = _reference_perplexities(
        lm, list(unique.values()), held_out, k=12, lmbda=reference_lambda, temperature=2.0
    )
    assert result.base_perplexity == pytest.approx(base, rel=1e-4)
    assert result.knn_perplexity == pytest.approx(knn, rel=1e-4)


def test_sliding_windows_score_every_token_once(tiny_models, corpus_dir, settings_factory) -> None:
    """Short windows still score each held-out token exactly once, and lambda=0 is the base LM."""
    settings = settings_factory(tiny_models["gpt2"], window=8, stride=3)
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    IngestWorker(lm, store, domain="d", window=8, stride=3, batch_size=3).run(
        list(read_corpus([corpus_dir]))
    )
    seqs = [lm.encode(HELD_OUT), lm.encode("x = 1")]
    knn_lm = KnnLM(
        lm,
        store,
        k=4,
        temperature=1.0,
        policy=FixedLambda(0.0),
        search=EXACT,
        window=8,
        stride=3,
        batch_size=2,
    )
    result = knn_lm.evaluate(seqs)
    store.close()
    assert result.tokens == sum(len(s) - 1 for s in seqs)
    assert result.queries == result.tokens
    assert result.knn_perplexity == pytest.approx(result.base_perplexity, rel=1e-6)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_a_text_scores_the_same_in_any_batch(model: str, tiny_models, settings_factory) -> None:
    """Batch mates of other lengths change nothing, to the bit: the service's batched answers
    equal `knnlm eval` on the text alone, and ingest stores the keys eval computes."""
    settings = settings_factory(tiny_models[model], window=128, stride=64)
    lm = load_language_model(settings)
    store = open_store(settings, create=True)
    texts = [HELD_OUT * 6, HELD_OUT]  # one forward for both in ingest: padded differently
    IngestWorker(lm, store, domain="d", window=128, stride=64, batch_size=4).run(
        [Document(f"doc{i}", text) for i, text in enumerate(texts)]
    )
    long, short = (lm.encode(text) for text in texts)
    assert len(short) < 64 < len(long)  # windows of 128 (3 of them) and of one width bucket
    knn_lm = KnnLM(
        lm, store, k=4, temperature=1.0, policy=FixedLambda(0.25), search=EXACT, window=128,
        stride=64, batch_size=4,
    )  # fmt: skip
    alone = next(iter(knn_lm.score([short])))
    batched = next(iter(knn_lm.score([long, short, long])))
    stored = sorted(
        (payload["offset"], key)
        for batch, _ in store.scroll()
        for key, payload in zip(batch.keys, batch.payloads, strict=True)
        if payload["source"] == "doc1"
    )
    store.close()
    rows = batched.lm.sequence == 1
    assert torch.equal(alone.lm.keys, batched.lm.keys[rows])
    assert torch.equal(alone.log_prob, batched.log_prob[rows])
    assert np.array_equal(np.stack([key for _, key in stored]), alone.lm.keys.numpy())


def test_cli_eval_exact_matches_reference(tiny_models, corpus_dir: Path, tmp_path: Path) -> None:
    """`knnlm ingest` then `knnlm eval --exact --json`, against the float64 brute force."""
    import json

    from click.testing import CliRunner

    from knn_store import KnnlmSettings
    from knnlm.cli import cli

    model = tiny_models["llama"]
    env = {
        "KNNLM_MODEL": str(model),
        "KNNLM_DATA_DIR": str(tmp_path / "data"),
        "KNNLM_MODEL_CACHE": str(tmp_path / "cache"),
        "KNNLM_WINDOW": "128",
        "KNNLM_STRIDE": "64",
    }
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(HELD_OUT)
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", str(corpus_dir), "-q"], env=env).exit_code == 0
    args = ["eval", str(held_out), "--exact", "--json", "-q", "--top-k", "12", "--lambda", "0.4"]
    result = runner.invoke(cli, [*args, "--temperature", "3"], env=env)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])

    lm = load_language_model(KnnlmSettings(model=str(model), key_type="ffn_input"))
    docs = {d.text: lm.encode(d.text) for d in read_corpus([corpus_dir])}
    base, knn = _reference_perplexities(
        lm, list(docs.values()), lm.encode(HELD_OUT), k=12, lmbda=0.4, temperature=3.0
    )
    assert got["base_perplexity"] == pytest.approx(base, rel=1e-4)
    assert got["knn_perplexity"] == pytest.approx(knn, rel=1e-4)
