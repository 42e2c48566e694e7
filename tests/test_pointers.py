"""Successor links (``rebuild --successors``) and pointer following (RetoMaton), against
numpy: the followed pointers' distribution equals a full kNN computed by brute force over
the same candidate set, and a whole eval equals the automaton replayed in plain Python."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.corpus import read_corpus
from ingest.worker import IngestWorker
from knn_store import (
    CollectionMeta,
    ConfigError,
    KnnLM,
    PointBatch,
    load_language_model,
    open_store,
)
from knn_store.knn import knn_log_probs
from knn_store.lambdas import FixedLambda
from knn_store.pointers import UNKNOWN, PointerState, follow, pointer_neighbours
from knn_store.store.base import NEXT_FIELD, KnnStore
from knn_store.store.client import QdrantClientStore
from knn_store.store.config import SearchOptions
from knn_store.store.edge import EdgeStore
from knn_store.store.point_ids import (
    document_hash,
    document_key,
    id_parts,
    make_point_ids,
    successor_ids,
)
from knn_store.store.transfer import copy_collection
from tests.reference import brute_force_knn, knn_probs

DIM, VOCAB = 8, 5  # few values: many neighbours share the token that comes
META = CollectionMeta(
    model="tiny",
    model_fingerprint="abc",
    key_type="final",
    dim=DIM,
    vocab_size=VOCAB,
    tokenizer="t:1",
)
DOC_LENGTHS = (40, 25, 33)


def _open(kind: str, path: Path, name: str) -> KnnStore:
    if kind == "edge":
        return EdgeStore(path / name, create=True)
    return QdrantClientStore.local(path / "local", collection=name, create=True)


def _documents(seed: int = 0):
    """Three documents: (hash, keys [n, DIM], tokens [n]); position p's value is tokens[p]."""
    rng = np.random.default_rng(seed)
    return [
        (
            document_hash("dom", f"text {i}"),
            rng.standard_normal((n, DIM)).astype(np.float32),
            rng.integers(0, VOCAB, n),
        )
        for i, n in enumerate(DOC_LENGTHS)
    ]


def _filled(kind: str, path: Path) -> tuple[KnnStore, list]:
    docs = _documents()
    store = _open(kind, path, "plain")
    store.ensure_collection(META)
    for h, keys, tokens in docs:
        ids = make_point_ids(h, np.arange(len(tokens)), tokens)
        payloads = [{"domain": "dom", "doc": document_key(h), "offset": i} for i in range(len(ids))]
        store.upsert(PointBatch(ids=ids, keys=keys, payloads=payloads))
    store.finalize()
    return store, docs


def test_successor_ids_name_the_next_position() -> None:
    h = document_hash("d", "t")
    ids = make_point_ids(h, np.array([0, 7, 2**32 - 2]), np.array([3, 4, 5]))
    doc, pos, tok = id_parts(ids)
    assert (
        doc.tolist() == [h] * 3 and pos.tolist() == [0, 7, 2**32 - 2] and tok.tolist() == [3, 4, 5]
    )
    succ = successor_ids(ids, np.array([9, 10, 11]))
    assert succ == make_point_ids(h, np.array([1, 8, 2**32 - 1]), np.array([9, 10, 11]))
    mixed = [uuid.UUID(ids[0]), ids[1], uuid.UUID(ids[2])]  # engines return UUID objects
    assert successor_ids(mixed, np.array([9, 10, 11])) == succ


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_rebuild_gives_every_point_its_successors_value(kind: str, tmp_path: Path) -> None:
    source, docs = _filled(kind, tmp_path)
    target = _open(kind, tmp_path, "linked")
    report = copy_collection(source, target, successors=True, batch=7)  # pages split documents
    assert report.points == sum(DOC_LENGTHS)
    assert target.meta is not None and target.meta.successors and not target.meta.copying
    assert source.meta is not None and not source.meta.successors
    for h, _, tokens in docs:
        ids = make_point_ids(h, np.arange(len(tokens)), tokens)
        found = target.retrieve(ids, with_keys=False, with_payload=[NEXT_FIELD])
        got = [found[i].payload[NEXT_FIELD] for i in ids]
        assert got == [*tokens[1:].tolist(), -1]  # the last position has no successor
        assert set(found[ids[0]].payload) == {NEXT_FIELD}  # only the field asked for
    source.close()
    target.close()


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_followed_pointers_equal_a_full_knn_over_the_same_candidates(
    kind: str, tmp_path: Path
) -> None:
    source, docs = _filled(kind, tmp_path)
    store = _open(kind, tmp_path, "linked")
    copy_collection(source, store, successors=True)
    keys = np.concatenate([d[1] for d in docs])  # [N, DIM], in document order
    values = np.concatenate([d[2] for d in docs])  # [N]
    start = np.cumsum([0, *DOC_LENGTHS[:-1]])  # first row of each document
    last = np.concatenate(
        [s + np.arange(n) == s + n - 1 for s, n in zip(start, DOC_LENGTHS, strict=True)]
    )

    rng = np.random.default_rng(1)
    k, b = 12, 4
    q0 = rng.standard_normal((b, DIM)).astype(np.float32)
    q1 = rng.standard_normal((b, DIM)).astype(np.float32)
    targets = np.array([0, 1, 2, 3])
    found = store.search(q0, k=k, options=SearchOptions(exact=True))
    state = PointerState()
    pointers = follow(
        store,
        positions=np.arange(b),
        point_ids=found.point_ids,
        token_ids=found.token_ids,
        nexts=np.full((b, k), UNKNOWN),
        targets=targets,
        state=state,
    )
    assert state.lookups == 1  # the matches' `next`; no key is read
    near, nexts = pointer_neighbours(store, q1, pointers, k=k, state=state)
    assert state.lookups == 2  # the engine scored every row's pointers (and read `next`)
    got = (
        knn_log_probs(
            torch.from_numpy(near.sq_distances),
            torch.from_numpy(near.token_ids),
            vocab_size=VOCAB,
            temperature=2.0,
        )
        .exp()
        .numpy()
    )

    # the reference: brute-force neighbours of q0, the rows right after those with the
    # target as value (within their document), and a full kNN of q1 over just those rows
    idx, _ = brute_force_knn(keys, q0, k)
    for i in range(b):
        cand = [j + 1 for j in idx[i] if values[j] == targets[i] and not last[j]]
        assert len(pointers[i]) == len(cand)
        assert sorted(pointers[i].values.tolist()) == sorted(values[cand].tolist())
        d2 = ((keys[cand].astype(np.float64) - q1[i]) ** 2).sum(-1)
        ref = knn_probs(d2[None], values[cand][None], VOCAB, 2.0)[0]
        np.testing.assert_allclose(got[i], ref, atol=1e-5)
        # the engine's float32 distances against float64 ones
        np.testing.assert_allclose(
            np.sort(near.sq_distances[i][: len(cand)]), np.sort(d2), rtol=1e-5
        )
        # the scoring read each pointer's own successor's value with it
        succ_next = [values[j + 1] if not last[j] else -1 for j in cand]
        assert sorted(nexts[i][: len(cand)].tolist()) == sorted(succ_next)
        assert (nexts[i][len(cand) :] == -1).all()
    assert sum(len(p) for p in pointers) > 0  # the test followed something

    # one step further: the pointers' `next` is known, so following needs no lookup
    targets2 = np.array([1, 2, 3, 4])
    further = follow(
        store,
        positions=np.arange(b) + 1,
        point_ids=near.point_ids,
        token_ids=near.token_ids,
        nexts=nexts,
        targets=targets2,
        state=state,
    )
    for i in range(b):
        cand = [j + 1 for j in idx[i] if values[j] == targets[i] and not last[j]]
        want = [j + 1 for j in cand if values[j] == targets2[i] and not last[j]]
        assert sorted(further[i].values.tolist()) == sorted(values[want].tolist())
        named = store.retrieve(further[i].ids, with_keys=False, with_payload=False)
        assert len(named) == len(want)  # every successor named exists
    assert state.lookups == 2
    source.close()
    store.close()


@pytest.mark.parametrize(("kind", "k", "pointer_min"), [("edge", 6, 3), ("local", 10, 2)])
def test_a_search_with_pointers_scores_the_union_as_a_full_knn_over_it(
    kind: str, k: int, pointer_min: int, tmp_path: Path, tiny_models, settings_factory
) -> None:
    """Two texts walked through ``KnnLM.finish`` in two batches: one tracks document 0
    (noisy copies of its keys, its tokens as targets), so pointers survive and are followed;
    the other is random, so searches meet a few pointers and score the union. Every
    position's p_kNN(target) equals RetoMaton replayed by brute force over the stored keys."""
    from knn_store.knn_lm import LMView

    source, docs = _filled(kind, tmp_path)
    store = _open(kind, tmp_path, "linked")
    copy_collection(source, store, successors=True)
    keys = np.concatenate([d[1] for d in docs]).astype(np.float64)  # [N, DIM]
    values = np.concatenate([d[2] for d in docs])  # [N]
    start = np.cumsum([0, *DOC_LENGTHS[:-1]])
    succ = np.concatenate(
        [s + np.r_[np.arange(1, n), -1 - s] for s, n in zip(start, DOC_LENGTHS, strict=True)]
    )  # [N], the next row of the same document, -1 at its end
    rng = np.random.default_rng(3)
    n = DOC_LENGTHS[0] - 1
    walk = {
        0: (docs[0][1][:n] + 0.3 * rng.standard_normal((n, DIM)), docs[0][2][:n]),
        1: (rng.standard_normal((n, DIM)), rng.integers(0, VOCAB, n)),
    }
    t = 2.0
    knn_lm = KnnLM(
        load_language_model(settings_factory(tiny_models["gpt2"])),  # unused but for vocab
        store,
        k=k,
        temperature=t,
        policy=FixedLambda(0.5),
        search=SearchOptions(exact=True),
        window=16,
        stride=8,
        pointer_min=pointer_min,
    )
    state = PointerState()
    got = {s: np.zeros(n) for s in walk}
    got_followed = {s: np.zeros(n, dtype=bool) for s in walk}
    widest = 0
    for lo, hi in ((0, 13), (13, n)):  # two batches: the pointers carry over
        rows = [(s, p) for p in range(lo, hi) for s in walk]
        m = len(rows)
        view = LMView(
            sequence=np.array([s for s, _ in rows]),
            position=np.array([p + 1 for _, p in rows]),
            keys=torch.tensor(np.stack([walk[s][0][p] for s, p in rows]), dtype=torch.float32),
            targets=torch.tensor([int(walk[s][1][p]) for s, p in rows]),
            lm_target_log_prob=torch.full((m,), -1.0),
            lm_entropy=torch.ones(m),
            lm_max_log_prob=torch.full((m,), -0.5),
            lm_log_probs=None,
            lm_seconds=0.0,
            forwards=1,
        )
        scored = knn_lm.finish(view, use_gate=False, pointers=state)
        assert scored.followed is not None and scored.neighbours.point_ids is not None
        for r, (s, p) in enumerate(rows):
            got[s][p] = float(scored.knn_log_prob[r].exp())
            got_followed[s][p] = bool(scored.followed[r])
            present = [str(i) for i in scored.neighbours.point_ids[r] if i is not None]
            assert len(present) == len(set(present))  # each point once
            widest = max(widest, len(present))
    unions = 0
    for s, (queries, targets) in walk.items():
        ref, ref_followed, sizes = _automaton_knn(
            keys, values, succ, queries, targets, vocab=VOCAB, k=k, t=t, pointer_min=pointer_min
        )
        np.testing.assert_array_equal(got_followed[s], ref_followed)
        np.testing.assert_allclose(got[s], ref, atol=1e-5)
        unions += int(((sizes > k) & ~ref_followed).sum())
    assert unions > 0 and widest > k  # some search was united with pointers
    assert state.united > 0 and state.added > 0  # and counted
    assert any(got_followed[0]) and not all(got_followed[0])
    source.close()
    store.close()


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_pointers_the_store_lacks_do_not_count(
    kind: str, tmp_path: Path, tiny_models, settings_factory
) -> None:
    """Successors named but not stored (as in a filtered copy) are left out of the scoring,
    and the threshold counts only the stored ones: too few, and the position searches,
    united with those it has."""
    from knn_store.pointers import Pointers

    source, docs = _filled(kind, tmp_path)
    store = _open(kind, tmp_path, "linked")
    copy_collection(source, store, successors=True)
    h, keys, tokens = docs[0]
    real = make_point_ids(h, np.arange(2), tokens[:2])
    absent = make_point_ids(document_hash("dom", "never stored"), np.arange(2), np.arange(2))
    pointers = Pointers(position=4, ids=[*real, *absent], values=np.array([*tokens[:2], 0, 1]))
    query = keys[:1] + 0.1  # near the first stored pointer
    k = 4
    lm = load_language_model(settings_factory(tiny_models["gpt2"]))  # unused but for vocab
    for pointer_min, follows in ((2, True), (3, False)):
        knn_lm = KnnLM(
            lm,
            store,
            k=k,
            temperature=2.0,
            policy=FixedLambda(0.5),
            search=SearchOptions(exact=True),
            window=16,
            stride=8,
            pointer_min=pointer_min,
        )
        state = PointerState(by_sequence={0: pointers})
        found, nexts, searched, followed = knn_lm.retomaton.step(
            state, np.array([0]), np.array([5]), query, np.array([True])
        )
        assert followed.tolist() == [follows] and searched.tolist() == [not follows]
        assert found.point_ids is not None
        present = {str(i) for i in found.point_ids[0] if i is not None}
        assert set(real) <= present and not present & set(absent)
        searched_ids = store.search(query, k=k, options=SearchOptions(exact=True)).point_ids
        assert searched_ids is not None
        union = {str(i) for i in searched_ids[0]} | set(real)
        assert present == (set(real) if follows else union)
        ref = ((keys[:2].astype(np.float64) - query.astype(np.float64)) ** 2).sum(-1)
        got = {str(i): d for i, d in zip(found.point_ids[0], found.sq_distances[0], strict=True)}
        np.testing.assert_allclose([got[i] for i in real], ref, rtol=1e-5)
        # the pointers' own `next` came with their scoring (the search's points: unknown)
        next_of = {str(i): n for i, n in zip(found.point_ids[0], nexts[0], strict=True)}
        assert [next_of[i] for i in real] == tokens[1:3].tolist()
        assert all(next_of[i] == UNKNOWN for i in present - set(real))
    source.close()
    store.close()


HELD_OUT = [
    "def add(a, b):\n    return a + b\ndef mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    print(i, i * i)\nThe quick brown fox jumps over the lazy dog.\n",
]


def _automaton_reference(
    keys, values, succ, queries, lm_target_lp, targets, *, vocab, k, t, lmbda, pointer_min
):
    """RetoMaton replayed by brute force over one text: float64 log p(target) [n] and
    whether each position followed pointers. ``succ[j]``: the row after row j in its
    document (-1 at the end). The LM's own numbers are checked in test_perplexity."""
    p_knn, followed, _ = _automaton_knn(
        keys, values, succ, queries, targets, vocab=vocab, k=k, t=t, pointer_min=pointer_min
    )
    out = np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lm_target_lp))
    return out, followed


def _automaton_knn(keys, values, succ, queries, targets, *, vocab, k, t, pointer_min):
    """p_kNN(target) float64 [n] of one text under RetoMaton, by brute force: with at least
    ``pointer_min`` pointers, a full kNN over them; with fewer, over the union of the k
    nearest rows and the pointers (each row once). Also whether each position followed,
    and the size of each position's candidate set."""
    out, followed, sizes, pointers = [], [], [], []
    for i, q in enumerate(queries.astype(np.float64)):
        if len(pointers) >= pointer_min:
            cand = np.array(pointers)
            followed.append(True)
        else:
            idx, _ = brute_force_knn(keys, q[None], k)
            found = [int(j) for j in idx[0] if j >= 0]
            cand = np.array(list(dict.fromkeys([*found, *pointers])), dtype=np.int64)
            followed.append(False)
        d2 = ((keys[cand] - q) ** 2).sum(-1)
        out.append(knn_probs(d2[None], values[cand][None], vocab, t)[0][targets[i]])
        sizes.append(len(cand))
        pointers = [int(succ[j]) for j in cand if values[j] == targets[i] and succ[j] >= 0]
    return np.array(out), np.array(followed), np.array(sizes)


@pytest.mark.parametrize("backend", ["edge", "local"])
def test_eval_with_pointers_equals_the_automaton_by_brute_force(
    tiny_models, corpus_dir: Path, settings_factory, backend: str
) -> None:
    settings = settings_factory(tiny_models["gpt2"], backend=backend, exact=True)
    lm = load_language_model(settings)
    plain = open_store(settings, create=True)
    IngestWorker(lm, plain, domain="code", window=16, stride=8).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    linked = open_store(
        settings_factory(tiny_models["gpt2"], backend=backend, collection="linked"), create=True
    )
    copy_collection(plain, linked, successors=True)
    n_points = linked.count()
    k = n_points + 5  # every point: no tie at the k-th neighbour can tell two searches apart
    args = dict(
        k=k,
        temperature=4.0,
        policy=FixedLambda(0.5),
        search=SearchOptions(exact=True),
        window=16,
        stride=8,
        batch_size=2,
    )

    with pytest.raises(ConfigError, match=r"rebuild .*--successors"):
        KnnLM(lm, plain, pointer_min=1, **args)
    texts = [lm.encode(t) for t in HELD_OUT]
    base = list(KnnLM(lm, linked, **args).score(texts))
    never = list(KnnLM(lm, linked, pointer_min=10**6, **args).score(texts))  # always searches
    for a, b in zip(base, never, strict=True):
        assert b.followed is not None and not b.followed.any()
        # k covers every point, so the union with the pointers adds no point: the same
        # distribution, up to the pointers' distances computed from their keys
        torch.testing.assert_close(a.log_prob, b.log_prob, atol=1e-5, rtol=0)

    pointer_min = 3
    scored = list(KnnLM(lm, linked, pointer_min=pointer_min, **args).score(texts))
    result = KnnLM(lm, linked, pointer_min=pointer_min, **args).evaluate(texts)
    assert result.followed == sum(int(s.followed.sum()) for s in scored) > 0
    assert result.queries + result.followed == result.tokens

    # the reference, from the stored points themselves (scrolled, not searched)
    batches = [p for p, _ in linked.scroll()]
    ids = [i for p in batches for i in p.ids]
    keys = np.concatenate([p.keys for p in batches]).astype(np.float64)
    doc, pos, values = id_parts(ids)
    row_of = {(int(d), int(p)): r for r, (d, p) in enumerate(zip(doc, pos, strict=True))}
    succ = np.array([row_of.get((int(d), int(p) + 1), -1) for d, p in zip(doc, pos, strict=True)])
    for s, text in enumerate(texts):
        rows = [(sc, i) for sc in scored for i in np.flatnonzero(sc.lm.sequence == s)]
        rows.sort(key=lambda r: int(r[0].lm.position[r[1]]))
        got = np.array([float(sc.log_prob[i]) for sc, i in rows])
        got_followed = np.array([bool(sc.followed[i]) for sc, i in rows])
        queries = np.stack([sc.lm.keys[i].numpy() for sc, i in rows])
        lm_lp = np.array([float(sc.lm.lm_target_log_prob[i]) for sc, i in rows], dtype=np.float64)
        ref, ref_followed = _automaton_reference(
            keys,
            values,
            succ,
            queries,
            lm_lp,
            text[1:],
            vocab=lm.vocab_size,
            k=k,
            t=4.0,
            lmbda=0.5,
            pointer_min=pointer_min,
        )
        np.testing.assert_array_equal(got_followed, ref_followed)
        np.testing.assert_allclose(got, ref, atol=1e-4)
    plain.close()
    linked.close()


def test_cli_refuses_pointers_on_an_old_collection_then_rebuild_links_it(
    tmp_path: Path, tiny_models, corpus_dir: Path
) -> None:
    from tests.test_cli import Knnlm, _json_ok, _one_line_error

    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _json_ok(knnlm.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    held_out = str(corpus_dir / "doc0.txt")
    _one_line_error(
        knnlm.eval(held_out, "--pointer-min", "2", "-q"), "knnlm rebuild", "--successors"
    )

    done = knnlm("rebuild", *knnlm.store_args(), "--to-collection", "linked", "--successors", "-q")
    assert done.exit_code == 0, done.output
    plain = _json_ok(knnlm.eval(held_out, "--exact", "-q", "--json", collection="linked"))
    assert "followed_pointers" not in plain and "cache" not in plain  # off by default
    both = ("--exact", "-q", "--json", "--pointer-min", "2", "--cache-weight", "0.2")
    out = _json_ok(knnlm.eval(held_out, *both, collection="linked"))
    # the held-out text is stored: its neighbours' successors carry on, so searches are saved
    assert out["followed_pointers"] > 0
    assert out["searches"] + out["followed_pointers"] == out["tokens"] == plain["tokens"]
    assert out["cache"] == {"weight": 0.2, "temperature": plain["temperature"]}
    assert out["knn_perplexity"] != plain["knn_perplexity"]
    # the same levers from the environment: the settings are the one source of these flags
    env = {"KNNLM_POINTER_MIN": "2", "KNNLM_CACHE_WEIGHT": "0.2"}
    from_env = _json_ok(knnlm.eval(held_out, *both[:3], collection="linked", env=env))
    for key in ("knn_perplexity", "followed_pointers", "searches", "pointer_min", "cache"):
        assert from_env[key] == out[key], key
    hot = _json_ok(
        knnlm.eval(held_out, *both, "--cache-temperature", "0.5", collection="linked", env=env)
    )
    assert hot["cache"] == {"weight": 0.2, "temperature": 0.5}
    _one_line_error(
        knnlm.eval(held_out, "--cache-weight", "1.5", "-q", collection="linked"), "--cache-weight"
    )
    helped = knnlm("eval", "--help")
    assert "[env: KNNLM_POINTER_MIN]" in helped.output and "RetoMaton" in helped.output


def test_session_builds_the_levers_from_the_settings(
    tiny_models, corpus_dir: Path, settings_factory
) -> None:
    from knn_store import open_session

    settings = settings_factory(tiny_models["gpt2"], exact=True)
    lm = load_language_model(settings)
    plain = open_store(settings, create=True)
    IngestWorker(lm, plain, domain="code", window=16, stride=8).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    linked_settings = settings.model_copy(update={"collection": "linked"})
    with open_store(linked_settings, create=True) as linked:
        copy_collection(plain, linked, successors=True)
    plain.close()
    with open_session(linked_settings, lm=lm) as session:  # the default: both off
        assert session.knn_lm.pointer_min == 0 and session.knn_lm.cache is None
    levers = {"pointer_min": 4, "cache_weight": 0.1}
    with open_session(linked_settings.model_copy(update=levers), lm=lm) as session:
        cache = session.knn_lm.cache
        assert session.knn_lm.pointer_min == 4 and cache is not None
        assert (cache.weight, cache.temperature) == (0.1, session.resolved.temperature)
    with pytest.raises(ConfigError, match=r"rebuild .*--successors"):
        open_session(settings.model_copy(update={"pointer_min": 1}), lm=lm)


def test_ingest_into_a_linked_collection_links_the_new_points(
    tiny_models, corpus_dir: Path, settings_factory, tmp_path: Path
) -> None:
    from ingest.corpus import Document

    settings = settings_factory(tiny_models["llama"])
    lm = load_language_model(settings)
    plain = open_store(settings, create=True)
    IngestWorker(lm, plain, domain="code", window=16, stride=8).run(
        list(read_corpus([corpus_dir], glob="**/*.txt"))
    )
    linked = open_store(settings_factory(tiny_models["llama"], collection="linked"), create=True)
    copy_collection(plain, linked, successors=True)
    text = "while True:\n    x = x + 1\n    if x > 9:\n        break\n"
    IngestWorker(lm, linked, domain="code", window=16, stride=8).run(
        [Document(text=text, source="new.txt")]
    )
    ids = lm.encode(text)
    h = document_hash("code", text)
    point_ids = make_point_ids(h, np.arange(len(ids) - 1), ids[1:])
    found = linked.retrieve(point_ids, with_keys=False, with_payload=[NEXT_FIELD])
    assert [found[i].payload[NEXT_FIELD] for i in point_ids] == [*ids[2:].tolist(), -1]
    plain.close()
    linked.close()
