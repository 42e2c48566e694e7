"""A three-node Qdrant cluster on loopback: sharded ingest and eval while a node fails.

Needs a ``qdrant`` executable (PATH or ``KNNLM_TEST_QDRANT_BIN``); skipped without one. The
scenario lives in ``tests/cluster.py`` (``benchmarks/cluster_faults.py`` prints its figures).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Cluster, node_failure

pytestmark = [pytest.mark.server, pytest.mark.slow]

WORDS = ("alloc", "free", "page", "lock", "mutex", "queue", "task", "irq", "timer", "sched")


def write_corpus(root: Path, documents: int, lines: int, seed: int = 0) -> Path:
    """Text with enough distinct documents that three workers run for several seconds, and
    no stretch of a window's length twice (names and numbers drawn from thousands), so two
    keys are equal only where documents begin alike."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        body = [
            f"def {rng.choice(WORDS)}_{rng.randrange(1000)}(x):\n"
            f"    return {rng.choice(WORDS)}(x, {rng.randrange(100)})\n"
            for _ in range(lines)
        ]
        (root / f"doc{d:03d}.py").write_text("".join(body))
    return root


@pytest.mark.parametrize("fault", ["kill", "restart"])
def test_a_node_fails_during_ingest_and_eval(
    fault: str, qdrant_binary: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "corpus", documents=60, lines=100)  # < k = 64: see cluster.py
    held = write_corpus(tmp_path / "held", documents=1, lines=150, seed=1) / "doc000.py"
    model = ["--model", str(tiny_models["llama"]), "--window", "32", "--stride", "16"]
    cluster = Cluster.start(qdrant_binary, tmp_path / "cluster")
    try:
        report = node_failure(
            cluster,
            fault=fault,  # type: ignore[arg-type]
            model_args=model,
            corpus=corpus,
            held=held,
            work=tmp_path / "work",
        )
    finally:
        cluster.stop()
    assert report.expected_points > 0
    # 0 lost, 0 duplicated, after the ingest fault and after the eval fault
    assert report.points_after_ingest == report.expected_points, report
    assert report.points_after_eval_fault == report.expected_points, report
    for counts in report.replica_counts:  # every replica of a shard holds the same points
        assert all(len(set(c)) == 1 and len(c) == 2 for c in counts.values()), report
    assert not report.eval_failed, report.notes
    assert report.ppl_during_fault == pytest.approx(report.ppl_before, rel=1e-6)
    assert report.check_ok, report.notes
