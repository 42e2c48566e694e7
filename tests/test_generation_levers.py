"""Pointer following and the document cache in generation (``decode``, so ``knnlm generate``
and the service): each generated step's distribution is what ``KnnLM.score`` gives at that
position of prompt plus generated text, rows keep their own memory, the cache sees the
prompt (checked by brute force), and with both levers off decode takes the stateless path.
``explain`` marks the tokens served by followed pointers and the cache's share (brute force)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import ConfigError, KnnLM, KnnlmSettings, load_language_model, open_store
from knn_store.decode_memory import DecodeMemory
from knn_store.doc_cache import DocumentCache
from knn_store.gate import RetrievalGate
from knn_store.generation import KnnLogitsProcessor, Sampling, Step, decode
from knn_store.knn_lm import lm_summary
from knn_store.lambdas import FixedLambda
from knn_store.lm import LanguageModel
from knn_store.store.base import KnnStore
from knn_store.store.config import SearchOptions
from knn_store.store.transfer import copy_collection
from knn_store.windows import Window
from tests.conftest import CORPUS_LINES
from tests.reference import knn_probs

WINDOW = 64  # one window holds prompt plus generation: eval's keys are decode's keys
PROMPTS = ["def add(a, b):\n    return", "for i in range(", "The quick brown"]


@dataclass
class Linked:
    settings: KnnlmSettings
    lm: LanguageModel
    store: KnnStore  # a collection with successor links (``rebuild --successors``)


@pytest.fixture(scope="module")
def linked(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Linked]:
    root = tmp_path_factory.mktemp("levers")
    for i, line in enumerate(CORPUS_LINES):
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"doc{i}.txt").write_text(line * 3)
    settings = KnnlmSettings(
        model=str(tiny_models["gpt2"]),
        data_dir=root / "data",
        model_cache=root / "cache",
        window=WINDOW,
        stride=WINDOW // 2,
        top_k=8,
        collection="plain",
        exact=True,
    )
    lm = load_language_model(settings)
    with open_store(settings, create=True) as plain:
        IngestWorker(lm, plain, domain="code", window=WINDOW, stride=WINDOW // 2).run(
            list(read_corpus([root / "corpus"], glob="**/*.txt"))
        )
        settings = settings.model_copy(update={"collection": "linked"})
        store = open_store(settings, create=True)
        copy_collection(plain, store, successors=True)
    yield Linked(settings, lm, store)
    store.close()


def _knn_lm(linked: Linked, **levers: Any) -> KnnLM:
    return KnnLM(
        linked.lm,
        linked.store,
        k=8,
        temperature=2.0,
        policy=FixedLambda(0.4),
        search=SearchOptions(exact=True),
        window=WINDOW,
        stride=WINDOW // 2,
        **levers,
    )


def _levers() -> dict[str, Any]:
    return {"pointer_min": 2, "cache": DocumentCache(temperature=3.0, weight=0.3)}


def _generate(
    knn_lm: KnnLM, prompts: list[np.ndarray], sampling: list[Sampling]
) -> tuple[list[list[int]], dict[int, list[Step]]]:
    """New tokens per row and each row's steps, with the whole distribution in ``top``."""
    steps: dict[int, list[Step]] = {r: [] for r in range(len(prompts))}
    out = decode(
        knn_lm,
        prompts,
        sampling,
        on_token=lambda row, step: steps[row].append(step),
        top_logprobs=knn_lm.lm.vocab_size,
    )
    return out, steps


def _distribution(step: Step, vocab: int) -> torch.Tensor:
    """float [V]: a step's log p of every token, from its ``top`` (all V of them)."""
    out = torch.full((vocab,), float("-inf"))
    tokens, log_probs = zip(*step.top, strict=True)
    out[list(tokens)] = torch.tensor(log_probs)
    return out


def _half_gate(knn_lm: KnnLM, text: np.ndarray) -> RetrievalGate:
    """A gate that searches where the LM's entropy is above its median over ``text``."""
    view = knn_lm.lm_view([(0, text, Window(start=0, end=len(text), first=0))], full=True)
    assert view.lm_log_probs is not None
    entropy, _ = lm_summary(view.lm_log_probs)
    mid = float(entropy.median())
    return RetrievalGate([mid, 0.0], [1e-3, 1.0], [1.0, 0.0], 0.0, threshold=0.5)


@pytest.mark.parametrize("gated", [False, True], ids=["no-gate", "gate"])
def test_each_generated_step_is_what_score_gives_at_that_position(
    linked: Linked, gated: bool
) -> None:
    lm = linked.lm
    prompt = lm.encode(PROMPTS[0])
    knn_lm = _knn_lm(linked, **_levers())
    n_new = 20
    if gated:  # the gate of an ungated run's text: it skips about half of its positions
        (first,), _ = _generate(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=n_new)])
        knn_lm = knn_lm.with_options(gate=_half_gate(knn_lm, np.r_[prompt, first]))
    (new,), steps = _generate(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=n_new)])
    assert len(new) == n_new and [s.token for s in steps[0]] == new
    text = np.r_[prompt, new]
    assert len(text) <= WINDOW
    (scored,) = knn_lm.score([text], full=True)  # one window: every position at once
    assert scored.log_probs is not None and scored.followed is not None
    row = {int(p): i for i, p in enumerate(scored.lm.position)}
    followed = []
    for j, step in enumerate(steps[0]):
        at = row[len(prompt) - 1 + j]  # the position whose next token step j drew
        torch.testing.assert_close(
            _distribution(step, lm.vocab_size), scored.log_probs[at], atol=1e-5, rtol=0
        )
        assert step.followed == bool(scored.followed[at])
        followed.append(bool(scored.followed[at]))
    # both ways occur among the generated steps (and in the prompt, which decode walks too)
    assert any(followed) and not all(followed)
    if gated:
        skipped = ~scored.searched & ~scored.followed
        assert skipped[len(prompt) - 1 :].any() and not skipped.all()


def test_rows_of_one_batch_keep_their_own_memory(linked: Linked) -> None:
    lm = linked.lm
    knn_lm = _knn_lm(linked, **_levers())
    prompts = [lm.encode(p) for p in PROMPTS]
    sampling = [
        Sampling(temperature=0, max_new_tokens=10),
        Sampling(temperature=0.8, seed=5, max_new_tokens=10),
        Sampling(temperature=0, max_new_tokens=10),
    ]
    together, steps = _generate(knn_lm, prompts, sampling)
    for r in range(len(prompts)):
        (alone,), solo = _generate(knn_lm, [prompts[r]], [sampling[r]])
        assert together[r] == alone
        for a, b in zip(steps[r], solo[0], strict=True):
            assert a.followed == b.followed
            torch.testing.assert_close(
                _distribution(a, lm.vocab_size), _distribution(b, lm.vocab_size), atol=1e-5, rtol=0
            )
    assert any(s.followed for r in steps for s in steps[r])
    # a row without retrieval in the batch neither follows nor changes the others
    mixed, mixed_steps = _generate(
        knn_lm, [prompts[0], prompts[1]], [sampling[0], Sampling(knn=False, max_new_tokens=4)]
    )
    assert mixed[0] == together[0]
    assert all(s.followed is None for s in mixed_steps[1])


def test_the_cache_sees_the_prompt_and_each_token_drawn(linked: Linked) -> None:
    """Cache weight 1 and no pointers: where there is memory, a step's distribution is the
    cache's alone, a full kNN over the keys of every earlier position of prompt and
    generation with the tokens that followed them as values."""
    lm = linked.lm
    t = 3.0
    knn_lm = _knn_lm(linked, cache=DocumentCache(temperature=t, weight=1.0))
    prompt = lm.encode(PROMPTS[1])
    (new,), steps = _generate(knn_lm, [prompt], [Sampling(temperature=0, max_new_tokens=4)])
    text = np.r_[prompt, new, 0]  # a dummy last token: the last step's key is scored too
    view = knn_lm.lm_view([(0, text, Window(start=0, end=len(text), first=0))])
    keys = view.keys.double().numpy()  # [len(text) - 1, dim]; position p at row p
    values = text[1:]
    for j, step in enumerate(steps[0]):
        q = len(prompt) - 1 + j  # the query's position: its earlier ones are memory
        d2 = ((keys[:q] - keys[q]) ** 2).sum(-1)
        ref = knn_probs(d2[None], values[:q][None], lm.vocab_size, t)[0]
        got = _distribution(step, lm.vocab_size).exp().double().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert len(prompt) > 2 and len(steps[0]) == 4


def test_with_the_levers_off_decode_is_the_stateless_path(
    linked: Linked, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = linked.lm
    prompts = [lm.encode(p) for p in PROMPTS]
    sampling = [Sampling(temperature=0.7, seed=s, max_new_tokens=6) for s in range(3)]
    # a cache of weight 0 goes through the memory and adds nothing, to the bit
    zero, zero_steps = _generate(
        _knn_lm(linked, cache=DocumentCache(temperature=1.0, weight=0.0)), prompts, sampling
    )

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decode used a memory with both levers off")

    monkeypatch.setattr(DecodeMemory, "start", refuse)
    monkeypatch.setattr(DecodeMemory, "step", refuse)
    off, off_steps = _generate(_knn_lm(linked), prompts, sampling)
    assert off == zero and off_steps == zero_steps
    assert all(s.followed is None for r in off_steps for s in off_steps[r])


def test_the_logits_processor_refuses_the_levers(linked: Linked) -> None:
    with pytest.raises(ConfigError, match="decode"):
        KnnLogitsProcessor(_knn_lm(linked, pointer_min=2))
    with pytest.raises(ConfigError, match="decode"):
        KnnLogitsProcessor(_knn_lm(linked, cache=DocumentCache(temperature=1.0, weight=0.2)))


def test_the_service_completes_with_the_levers_as_decode_does(linked: Linked) -> None:
    from knn_store import open_session
    from knnlm.service.app import create_app

    # the session opens its own collection: a linked copy of the fixture's
    served = linked.settings.model_copy(update={"collection": "served"})
    with open_store(served, create=True) as target:
        copy_collection(linked.store, target, successors=True)
    settings = served.model_copy(update={"pointer_min": 2, "cache_weight": 0.3})
    bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in PROMPTS[:2]]

    async def ask(app: Any) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://knnlm") as client:
            return list(
                await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            )

    with open_session(settings, lm=linked.lm) as session:
        knn_lm = session.knn_lm
        assert knn_lm.pointer_min == 2 and knn_lm.cache is not None
        app = create_app(session, max_batch=8, batch_wait_ms=50)
        try:
            responses = asyncio.run(ask(app))
            # one decode for both: each row must still see only its own memory
            stats = app.state.batcher.stats
            assert stats.to_dict()["largest_batch"] == len(bodies)
        finally:
            app.state.batcher.close()
        followed: list[bool | None] = []
        for body, response in zip(bodies, responses, strict=True):
            assert response.status_code == 200, response.text
            (new,), steps = _generate(
                knn_lm,
                [linked.lm.encode(body["prompt"])],
                [Sampling(temperature=0, max_new_tokens=8)],
            )
            (choice,) = response.json()["choices"]
            assert choice["text"] == linked.lm.tokenizer.decode(new, skip_special_tokens=True)
            assert response.json()["usage"]["completion_tokens"] == len(new)
            followed += [s.followed for s in steps[0]]
        assert any(followed)  # the service's rows followed pointers too
        # /metrics' counts: each generated token searched, followed, or (no gate) neither
        assert stats.followed["complete"] == sum(map(bool, followed))
        assert stats.searched["complete"] == len(followed) - sum(map(bool, followed))
        assert stats.skipped["complete"] == 0


def test_knnlm_generate_takes_the_lever_flags_and_reports_the_followed_steps(
    linked: Linked,
) -> None:
    import json

    from click.testing import CliRunner

    from knn_store import open_session
    from knnlm.cli import cli

    settings = linked.settings.model_copy(update={"collection": "cli"})
    with open_store(settings, create=True) as target:
        copy_collection(linked.store, target, successors=True)
    flags = ["--model", settings.model, "--data-dir", str(settings.data_dir)]
    flags += ["--collection", "cli", "--top-k", "8", "--exact"]
    levers = ["--pointer-min", "2", "--cache-weight", "0.3"]
    done = CliRunner().invoke(
        cli,
        ["generate", "-p", PROMPTS[0], *flags, *levers, "--sample-temperature", "0", "--json"],
        env={"KNNLM_MODEL_CACHE": str(settings.model_cache)},
    )
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert out["pointer_min"] == 2 and out["cache"]["weight"] == 0.3
    on = settings.model_copy(update={"pointer_min": 2, "cache_weight": 0.3})
    with open_session(on, lm=linked.lm) as session:
        (new,), steps = _generate(
            session.knn_lm, [linked.lm.encode(PROMPTS[0])], [Sampling(temperature=0)]
        )
    assert out["completion"] == linked.lm.tokenizer.decode(new, skip_special_tokens=True)
    assert out["followed_pointers"] == sum(bool(s.followed) for s in steps[0]) > 0

    # explain takes the same flags and marks what the library's explain marks
    text = PROMPTS[0] + " a + b\n" + PROMPTS[0]
    done = CliRunner().invoke(
        cli,
        ["explain", "-t", text, *flags, *levers, "--neighbours", "0", "--json"],
        env={"KNNLM_MODEL_CACHE": str(settings.model_cache)},
    )
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    with open_session(on, lm=linked.lm) as session:
        (scored,) = list(session.knn_lm.score([linked.lm.encode(text)], full=True))
    assert scored.followed is not None and scored.followed.any()
    assert [r["followed"] for r in rows] == scored.followed.tolist()
    assert [r["cache_weight"] for r in rows[1:]] == pytest.approx([0.3] * (len(rows) - 1))
    shown = CliRunner().invoke(
        cli,
        ["explain", "-t", text, *flags, *levers, "--neighbours", "0"],
        env={"KNNLM_MODEL_CACHE": str(settings.model_cache)},
    )
    assert shown.exit_code == 0, shown.output
    assert "from followed pointers (no search)" in shown.stdout and "cache " in shown.stdout


def test_explain_marks_followed_tokens_and_the_cache_share(linked: Linked) -> None:
    from knn_store.explain import explain_text

    knn_lm = _knn_lm(linked, **_levers())
    text = PROMPTS[0] + " a + b\n" + PROMPTS[0]
    rows = list(explain_text(knn_lm, text, show_neighbours=2))
    (scored,) = list(knn_lm.score([linked.lm.encode(text)], full=True))
    assert scored.followed is not None
    assert [r.followed for r in rows] == scored.followed.tolist()
    assert any(r.followed for r in rows) and any(r.searched for r in rows)
    assert not any(r.followed and r.searched for r in rows)
    # the cache by brute force: earlier positions' keys, their next tokens as values
    cache = _levers()["cache"]
    keys = scored.lm.keys.double().numpy()  # [m, dim]
    targets = scored.lm.targets.numpy()  # [m]
    for j, row in enumerate(rows):
        lm_mix = (1 - row.lmbda) * row.lm_prob + row.lmbda * row.knn_prob
        if j == 0:  # the text's first position: nothing earlier, the cache stays out
            assert row.cache_weight == 0.0 and row.cache_prob == 0.0
            assert row.prob == pytest.approx(lm_mix, rel=1e-5)
            continue
        d2 = ((keys[:j] - keys[j]) ** 2).sum(-1)  # [j]
        expected = knn_probs(d2[None], targets[:j][None], linked.lm.vocab_size, cache.temperature)[
            0, targets[j]
        ]
        assert row.cache_prob == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert row.cache_weight == pytest.approx(cache.weight)
        mixed = (1 - cache.weight) * lm_mix + cache.weight * row.cache_prob
        assert row.prob == pytest.approx(mixed, rel=1e-4, abs=1e-7)
    # and without the levers, nothing is marked
    plain = list(explain_text(_knn_lm(linked), text, show_neighbours=0))
    assert not any(r.followed for r in plain)
    assert all(r.cache_prob is None and r.cache_weight == 0.0 for r in plain)
