"""A three-node Qdrant cluster on loopback, and what knnlm does when one node fails.

``Cluster`` starts three ``qdrant`` processes (REST, gRPC and peer-to-peer ports all on
127.0.0.1) that form one cluster. ``node_failure`` runs the scenario of the cluster tests and
of ``benchmarks/cluster_faults.py``: three sharded ingest workers at once into a collection of
3 shards x 2 replicas, a node failing in the middle of the ingest and again in the middle of an
eval, and the counts checked once the node is back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from tests.qdrant_server import QdrantNode

Fault = Literal["kill", "restart"]


@dataclass
class Cluster:
    nodes: list[QdrantNode]

    @classmethod
    def start(cls, binary: Path, root: Path, size: int = 3) -> Cluster:
        first = QdrantNode(binary, root / "node0", cluster=True).start()
        nodes = [first]
        for i in range(1, size):
            node = QdrantNode(binary, root / f"node{i}", cluster=True, bootstrap=first.p2p_uri)
            nodes.append(node.start())
        cluster = cls(nodes)
        cluster.wait_peers(size)
        return cluster

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def wait_peers(self, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = [len(_get(node, "/cluster")["peers"]) for node in self.nodes if node.running]
            if counts and all(c == n for c in counts):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not reach {n} peers in {timeout:.0f}s")

    def replica_states(self, collection: str) -> list[str]:
        """The state of every shard replica, as the first running node sees them."""
        node = next(n for n in self.nodes if n.running)
        info = _get(node, f"/collections/{collection}/cluster")
        shards = info["local_shards"] + info["remote_shards"]
        return [str(s["state"]) for s in shards]

    def wait_active(self, collection: str, replicas: int, timeout: float = 180.0) -> float:
        """Wait until every one of ``replicas`` shard replicas is Active; the seconds it took."""
        started = time.monotonic()
        states: list[str] = []
        while time.monotonic() - started < timeout:
            try:
                states = self.replica_states(collection)
            except (httpx.HTTPError, KeyError):
                states = []
            if len(states) == replicas and all(s == "Active" for s in states):
                return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(f"replicas not all Active after {timeout:.0f}s: {states}")

    def replica_counts(self, collection: str) -> dict[int, list[int]]:
        """Points per replica of each shard, as each running node counts its own copies."""
        counts: dict[int, list[int]] = {}
        for node in self.nodes:
            if not node.running:
                continue
            for shard in _get(node, f"/collections/{collection}/cluster")["local_shards"]:
                counts.setdefault(int(shard["shard_id"]), []).append(int(shard["points_count"]))
        return dict(sorted(counts.items()))

    def count(self, collection: str) -> int:
        node = next(n for n in self.nodes if n.running)
        response = httpx.post(
            f"{node.url}/collections/{collection}/points/count", json={"exact": True}, timeout=60
        )
        response.raise_for_status()
        return int(response.json()["result"]["count"])


def _get(node: QdrantNode, path: str) -> dict:
    response = httpx.get(f"{node.url}{path}", timeout=10)
    response.raise_for_status()
    return response.json()["result"]


@dataclass
class FaultReport:
    """What one node failure did (the README's reliability table)."""

    fault: Fault
    expected_points: int = 0
    points_after_ingest: int = 0
    workers_failed: int = 0
    rerun_resumed_documents: int = 0  # documents a rerun found complete and skipped
    ingest_seconds: float = 0.0
    ppl_before: float = 0.0
    ppl_during_fault: float = 0.0
    eval_failed: bool = False
    points_after_eval_fault: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    replica_counts: list[dict[int, list[int]]] = field(default_factory=list)
    check_ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return max(
            0, self.expected_points - min(self.points_after_ingest, self.points_after_eval_fault)
        )

    @property
    def duplicated(self) -> int:
        return max(
            0, max(self.points_after_ingest, self.points_after_eval_fault) - self.expected_points
        )


def knnlm(
    args: list[str], env: dict[str, str], *, stderr: int | None = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``knnlm`` in its own process (a worker, or an eval to fault in flight)."""
    return subprocess.Popen(
        [sys.executable, "-m", "knnlm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def _environment(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNNLM_")}
    env.update(KNNLM_MODEL_CACHE=str(cache), KNNLM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _wait_for_progress(process: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """Read the process's stderr until ``pattern`` appears (tqdm bars end lines with \\r)."""
    assert process.stderr is not None
    seen: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        while True:
            chunk = process.stderr.read(1)
            if not chunk:
                return
            seen.append(chunk)
            if chunk in "\r\n" and re.search(pattern, "".join(seen[-400:])):
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout):
        raise TimeoutError(f"no progress matching {pattern!r}: {''.join(seen)[-500:]}")
    return "".join(seen)


def node_failure(
    cluster: Cluster,
    *,
    fault: Fault,
    model_args: list[str],
    corpus: Path,
    held: Path,
    work: Path,
    # Every document's first positions share their contexts (BOS, then a common prefix):
    # equal keys with other next tokens. Where such a tie crosses the k-th neighbour, which
    # of them a search returns depends on the replica that answered; a k above the number
    # of documents keeps every tie whole, so any replica's answer is the same.
    search_args: tuple[str, ...] = ("--top-k", "64"),
    collection: str = "cluster",
) -> FaultReport:
    """Ingest ``corpus`` with three workers into 3 shards x 2 replicas and fail node 2 halfway
    (``kill``: SIGKILL, back after the workers end; ``restart``: SIGTERM and straight back),
    then evaluate ``held`` and fail node 1 halfway. Returns what was counted."""
    report = FaultReport(fault)
    env = _environment(work / "cache")
    # What one embedded worker stores: the count every cluster run must end with.
    reference = subprocess.run(
        [sys.executable, "-m", "knnlm", "ingest", str(corpus), *model_args, "-q", "--json",
         "--data-dir", str(work / "edge"), "--collection", "reference"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    report.expected_points = json.loads(reference.stdout)["points_total"]

    # Both replicas acknowledge every write: with one, a replica that missed writes while
    # its node was away could answer reads before it caught up (seen once in a SIGTERM run).
    layout = ["--shard-number", "3", "--replication-factor", "2", "--write-consistency-factor", "2"]
    exact = ["--vector-datatype", "float32", "--quantization", "none", "--upsert-batch", "64"]

    def worker(i: int, node: QdrantNode) -> subprocess.Popen[str]:
        store = ["--backend", "qdrant", "--url", node.url, "--collection", collection]
        store += ["--retries", "2", "--timeout", "20"]
        args = ["ingest", str(corpus), *model_args, *store, *layout, *exact, "--shard", f"{i}/3"]
        return knnlm([*args, "-q", "--json"], env)

    victim = cluster.nodes[2]
    started = time.monotonic()
    workers = [worker(i, cluster.nodes[i]) for i in range(3)]
    _wait_for_points(cluster, collection, report.expected_points // 6, workers)
    _fail(victim, fault)
    results = [(w, *w.communicate(timeout=600)) for w in workers]
    failed = [i for i, (w, _, _) in enumerate(results) if w.returncode != 0]
    report.workers_failed = len(failed)
    if not victim.running:  # killed: back once the workers are done
        victim.start()
    report.recovery_seconds.append(cluster.wait_active(collection, replicas=6))
    for i in failed:  # the worker says what it wrote; a rerun resumes
        _, _, err = results[i]
        report.notes.append(err.strip().splitlines()[-1] if err.strip() else "")
        rerun = worker(i, cluster.nodes[0])
        out, err = rerun.communicate(timeout=600)
        if rerun.returncode != 0:
            raise RuntimeError(f"worker {i} rerun failed: {err}")
        report.rerun_resumed_documents += json.loads(out)["resumed_documents"]
    report.ingest_seconds = time.monotonic() - started
    report.points_after_ingest = cluster.count(collection)
    report.replica_counts.append(cluster.replica_counts(collection))

    # Eval through node 0 while node 1 fails: the replicas answer.
    store = ["--backend", "qdrant", "--url", cluster.nodes[0].url, "--collection", collection]
    evaluate = ["eval", str(held), *model_args, *search_args, *store, "--exact", "--json"]
    evaluate += ["--search-batch", "4", "--retries", "3", "--timeout", "20"]
    before = subprocess.run(
        [sys.executable, "-m", "knnlm", *evaluate, "-q"], env=env, capture_output=True, text=True
    )
    if before.returncode != 0:
        raise RuntimeError(f"eval failed with every node up: {before.stderr}")
    report.ppl_before = json.loads(before.stdout)["knn_perplexity"]
    during = knnlm(evaluate, env)
    _wait_for_progress(during, r"\b([1-9]\d?)%\|", timeout=300)
    _fail(cluster.nodes[1], fault)
    out, err = during.communicate(timeout=600)
    if during.returncode == 0:
        report.ppl_during_fault = json.loads(out)["knn_perplexity"]
    else:
        report.eval_failed = True
        report.notes.append(err.strip().splitlines()[-1] if err.strip() else "")
    if not cluster.nodes[1].running:
        cluster.nodes[1].start()
    report.recovery_seconds.append(cluster.wait_active(collection, replicas=6))
    report.points_after_eval_fault = cluster.count(collection)
    report.replica_counts.append(cluster.replica_counts(collection))
    check = subprocess.run(
        [sys.executable, "-m", "knnlm", "check", *store, "-q"], env=env, capture_output=True
    )
    report.check_ok = check.returncode == 0
    if not report.check_ok:
        report.notes.append(check.stdout.decode() + check.stderr.decode())
    return report


def _wait_for_points(
    cluster: Cluster, collection: str, n: int, workers: list[subprocess.Popen[str]]
) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if all(w.poll() is not None for w in workers):
            raise RuntimeError("the workers ended before the fault: make the corpus larger")
        try:
            if cluster.count(collection) >= n:
                return
        except httpx.HTTPError:
            pass  # not created yet
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {n} points after 600s")


def _fail(node: QdrantNode, fault: Fault) -> None:
    if fault == "kill":
        node.kill()
    else:
        node.stop()
        node.start()
