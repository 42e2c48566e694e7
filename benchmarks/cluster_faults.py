"""A node of a three-node Qdrant cluster fails in the middle of an ingest and of an eval.

Runs the scenario of ``tests/test_cluster.py`` (``tests/cluster.py``) once per fault, each on
a fresh cluster of three ``qdrant`` processes on loopback, and prints the README's
reliability table (and writes it, with the raw figures, under ``--results``):

    python benchmarks/cluster_faults.py --qdrant /path/to/qdrant

- kill: SIGKILL of node 2 while three ``knnlm ingest --shard i/3`` workers write into 3
  shards x 2 replicas (it comes back after the workers end), then SIGKILL of node 1 while
  ``knnlm eval`` searches through node 0 (back after the eval);
- restart: the same nodes stopped with SIGTERM and started again at once.

The model is a small randomly initialised Llama built here (the scenario is about counts
and answers, not perplexity); the corpus is generated Python-like text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.cluster import Cluster, FaultReport, node_failure  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402
from tests.test_cluster import write_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qdrant", type=Path, default=shutil.which("qdrant"), help="binary")
    parser.add_argument("--documents", type=int, default=60, help="corpus documents (< k = 64)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/cluster")
    args = parser.parse_args()
    if args.qdrant is None:
        parser.error("no qdrant executable: pass --qdrant or put it on PATH")
    args.results.mkdir(parents=True, exist_ok=True)
    reports: list[tuple[FaultReport, float]] = []
    with tempfile.TemporaryDirectory(prefix="knnlm-cluster-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", "llama")
        corpus = write_corpus(root / "corpus", documents=args.documents, lines=80)
        held = write_corpus(root / "held", documents=1, lines=300, seed=1) / "doc000.py"
        model_args = ["--model", str(model), "--window", "32", "--stride", "16"]
        for fault in ("kill", "restart"):
            cluster = Cluster.start(args.qdrant, root / f"cluster-{fault}")
            started = time.monotonic()
            try:
                report = node_failure(
                    cluster,
                    fault=fault,
                    model_args=model_args,
                    corpus=corpus,
                    held=held,
                    work=root / f"work-{fault}",
                )
            finally:
                cluster.stop()
            reports.append((report, time.monotonic() - started))
            print(json.dumps(asdict(report)), file=sys.stderr)
    table = _table(reports)
    print(table)
    (args.results / "results.md").write_text(table + "\n")
    raw = [{**asdict(r), "lost": r.lost, "duplicated": r.duplicated} for r, _ in reports]
    (args.results / "results.json").write_text(json.dumps(raw, indent=1) + "\n")


def _table(reports: list[tuple[FaultReport, float]]) -> str:
    rows = [
        "| node fault | points expected | after ingest fault | after eval fault | lost | "
        "duplicated | ingest workers failed (rerun) | eval ppl, all up | eval ppl, node down | "
        "replicas Active again | `knnlm check` |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, _ in reports:
        label = "kill -9" if r.fault == "kill" else "SIGTERM + restart"
        during = "failed" if r.eval_failed else f"{r.ppl_during_fault:.6f}"
        recovery = " / ".join(f"{s:.1f} s" for s in r.recovery_seconds)
        rows.append(
            f"| {label} | {r.expected_points:,} | {r.points_after_ingest:,} | "
            f"{r.points_after_eval_fault:,} | {r.lost} | {r.duplicated} | "
            f"{r.workers_failed} of 3 ({r.rerun_resumed_documents} documents found complete) | "
            f"{r.ppl_before:.6f} | {during} | {recovery} | {'sound' if r.check_ok else 'DAMAGED'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
