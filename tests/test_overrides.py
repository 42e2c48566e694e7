"""A request's overrides are resolved as the same flags are for eval: on a collection tuned
with levers (pointer following and a document cache), ``Session.with_overrides`` (what the
service's ``/v1/score`` uses) gives the kNN-LM that ``open_session`` gives for the same flags,
for each override alone and together. Before, an explicit lambda kept the tuned levers in the
service and turned them off in eval.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from knn_store import KnnlmSettings, load_language_model, open_session, open_store
from tests.conftest import CORPUS_LINES, half_skipping_gate

HELD = "def add(a, b):\n    return a * b\nclass Stack:\n    def push(self, x):\n"
OVERRIDES: list[dict[str, Any]] = [
    {"lmbda": 0.3},
    {"temperature": 5.0},
    {"top_k": 4},
    {"lmbda": 0.3, "temperature": 5.0, "top_k": 4},
    {"temperature": 5.0, "top_k": 4},
]


@pytest.fixture(scope="module")
def tuned(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KnnlmSettings]:
    """A collection with successor links and a saved policy that carries both levers."""

    from ingest.corpus import read_corpus
    from ingest.worker import IngestWorker
    from knn_store.lambdas import BucketLambda
    from knn_store.saved_policy import SavedPolicy
    from knn_store.store.transfer import copy_collection

    root = tmp_path_factory.mktemp("overrides")
    (root / "corpus").mkdir()
    for i, line in enumerate(CORPUS_LINES):
        (root / "corpus" / f"doc{i}.txt").write_text(line * 3)
    settings = KnnlmSettings(
        model=str(tiny_models["gpt2"]),
        data_dir=root / "data",
        model_cache=root / "cache",
        window=16,
        stride=8,
        top_k=8,
        collection="plain",
        exact=True,
    )
    lm = load_language_model(settings)
    with open_store(settings, create=True) as plain:
        IngestWorker(lm, plain, domain="code", window=16, stride=8).run(
            list(read_corpus([root / "corpus"], glob="**/*.txt"))
        )
        settings = settings.model_copy(update={"collection": "tuned"})
        with open_store(settings, create=True) as store:
            copy_collection(plain, store, successors=True)
            gate = half_skipping_gate(lm, HELD)
            assert store.meta is not None
            store.save_policy(
                SavedPolicy(
                    policy=BucketLambda("d_min", [1.0], [0.7, 0.2]),
                    temperature=2.0,
                    k=8,
                    model_fingerprint=store.meta.model_fingerprint,
                    key_type=store.meta.key_type,
                    gate=gate,
                    pointer_min=2,
                    cache_weight=0.3,
                    cache_temperature=3.0,
                ).to_dict()
            )
    yield settings


def _knobs(knn_lm: Any) -> dict[str, Any]:
    cache = knn_lm.cache
    return {
        "k": knn_lm.k,
        "temperature": knn_lm.temperature,
        "policy": repr(knn_lm.policy),
        "gate": None if knn_lm.gate is None else knn_lm.gate.threshold,
        "pointer_min": knn_lm.pointer_min,
        "cache": None if cache is None else (cache.weight, cache.temperature),
    }


def test_the_tuned_session_uses_both_levers(tuned: KnnlmSettings) -> None:
    with open_session(tuned) as session:
        knobs = _knobs(session.knn_lm)
    assert knobs["pointer_min"] == 2 and knobs["cache"] == (0.3, 3.0)
    assert knobs["gate"] is not None


@pytest.mark.filterwarnings("ignore:the tuned policy was fitted with --top-k")
@pytest.mark.parametrize("override", OVERRIDES, ids=lambda o: ",".join(o))
def test_a_requests_overrides_equal_eval_with_the_same_flags(
    tuned: KnnlmSettings, override: dict[str, Any]
) -> None:
    with open_session(tuned) as served:  # one holder of an Edge collection at a time
        lm = served.lm
        by_request = served.with_overrides(**override)
        ids = served.encode([HELD])
        knobs, got = _knobs(by_request), by_request.evaluate(ids)
    with open_session(tuned.model_copy(update=override), lm=lm) as flagged:
        assert knobs == _knobs(flagged.knn_lm)
        want = flagged.knn_lm.evaluate(ids)
    assert got.knn_nll == pytest.approx(want.knn_nll, rel=1e-9)
    assert got.queries == want.queries
    if "lmbda" in override:  # an explicit lambda: fixed, no gate, no tuned levers
        assert knobs["pointer_min"] == 0 and knobs["cache"] is None
