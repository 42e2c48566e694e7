"""The datastore at scale: SmolLM2-135M keys of the Linux kernel docs, 100k to 1M points.

Every stage is resumable (results land in ``<work>/bench/*.json`` and are reused), and each
table of the README comes from one command:

    python benchmarks/scale.py ingest        # knnlm ingest of 1M datastore tokens (once)
    python benchmarks/scale.py reference     # LM outputs of valid/test, exact float32 top-k
    python benchmarks/scale.py sizes         # 100k/300k/1M: tune on valid, test perplexity
    python benchmarks/scale.py configs       # storage settings at 1M: speed, recall, bytes
    python benchmarks/scale.py k             # the cost of k: 1024, 256, 64
    python benchmarks/scale.py throughput    # base LM vs kNN-LM eval tokens/s, same run
    python benchmarks/scale.py ingest-speed  # ingest vs LM-only forward tokens/s at 1M
    python benchmarks/scale.py report        # tables (results.md) and plots

The split is ``kernel_docs.py``'s interleaved one (files in path order; every tenth file to
test, every tenth offset five to validation, the rest to the datastore), with 1M datastore
tokens; the 100k and 300k datastores are its first files, copied out of the 1M collection
by document (no LM run). The exact reference is a batched torch brute force over the keys
scrolled out of the collection. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.kernel_docs import make_splits  # noqa: E402

SIZES = {"100k": 100_000, "300k": 300_000, "1m": None}  # None: every datastore file
DOMAIN = "kernel-docs"
K = 1024
WINDOW, STRIDE = 512, 256

# Storage settings measured at 1M points; the first is the source the others are copied from.
CONFIGS: dict[str, dict[str, Any]] = {
    "f32": {"datatype": "float32"},
    "f16": {"datatype": "float16"},
    "f16-disk-int8": {"datatype": "float16", "quantization": "int8", "vectors_on_disk": True},
    "f16-disk-turbo4": {"datatype": "float16", "quantization": "turbo4", "vectors_on_disk": True},
    "f16-disk-binary": {"datatype": "float16", "quantization": "binary", "vectors_on_disk": True},
    "f16-disk-turbo4-m8-index-disk": {
        "datatype": "float16",
        "quantization": "turbo4",
        "vectors_on_disk": True,
        "index_on_disk": True,
        "hnsw_m": 8,
        "hnsw_ef_construct": 64,
    },
}
# Search settings tried on each storage setting: (name, SearchOptions fields).
SEARCHES: list[tuple[str, dict[str, Any]]] = [
    ("ef=k", {"hnsw_ef": K}),
    ("ef=2k", {"hnsw_ef": 2 * K}),
]
QUANTIZED_SEARCHES: list[tuple[str, dict[str, Any]]] = [
    ("ef=k, no rescore", {"hnsw_ef": K, "rescore": False}),
    ("ef=k, rescore x1", {"hnsw_ef": K, "rescore": True, "oversampling": 1.0}),
    ("ef=k, rescore x2", {"hnsw_ef": K, "rescore": True, "oversampling": 2.0}),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "stage",
        choices=[
            "ingest",
            "reference",
            "sizes",
            "configs",
            "k",
            "throughput",
            "ingest-speed",
            "report",
            "measure",
        ],
    )
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "kd-scale")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/scale")
    parser.add_argument("--config", help="(measure) the collection's config name")
    parser.add_argument("--only", nargs="*", help="(configs) measure only these configs")
    parser.add_argument("--chosen", default="f16-disk-turbo4", help="config for k/throughput")
    parser.add_argument("--hnsw-ef", type=int, help="(throughput) search ef of the chosen")
    parser.add_argument("--oversampling", type=float, help="(throughput) of the chosen")
    parser.add_argument("--top-k", type=int, help="(throughput) k of the chosen")
    args = parser.parse_args()
    search = {
        key: value
        for key, value in (
            ("hnsw_ef", args.hnsw_ef),
            ("oversampling", args.oversampling),
            ("top_k", args.top_k),
        )
        if value is not None
    }
    bench = Bench(args.work, args.results)
    if args.stage == "measure":
        print(json.dumps(bench.measure_in_process(args.config)))
        return
    stage: Callable[..., Any] = {
        "ingest": bench.ingest,
        "reference": bench.reference,
        "sizes": bench.sizes,
        "configs": lambda: bench.configs(args.only),
        "k": lambda: bench.cost_of_k(args.chosen),
        "throughput": lambda: bench.throughput(args.chosen, search),
        "ingest-speed": lambda: bench.ingest_speed(args.chosen),
        "report": bench.report,
    }[args.stage]
    stage()


def collection(size: str, config: str = "f32") -> str:
    return f"kd-{size}-{config}"


class Bench:
    def __init__(self, work: Path, results: Path) -> None:
        self.work = work
        self.out = work / "bench"
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = results
        self.results.mkdir(parents=True, exist_ok=True)
        self.splits = make_splits(work, "interleaved", 1_000_000, 12_000)

    # --- helpers ---------------------------------------------------------------------------

    def settings(self, name: str, **changes: Any):
        from knn_store import KnnlmSettings

        fields = {
            "data_dir": self.work / "data",
            "collection": name,
            "window": WINDOW,
            "stride": STRIDE,
            "key_type": "ffn_input",
            "top_k": K,
        }
        return KnnlmSettings(**{**fields, **changes})

    def copy(self, name: str, storage: Any, flt: Any = None) -> float:
        """Seconds to copy the 1M collection (the points ``flt`` selects) into ``name``."""
        from knn_store import open_store
        from knn_store.store.transfer import copy_collection

        with (
            open_store(self.settings(collection("1m"))) as source,
            open_store(self.settings(name), create=True) as target,
        ):
            started = time.perf_counter()
            copy_collection(
                source,
                target,
                storage=storage,
                filter=flt,
                checkpoint_dir=self.work / "data" / ".transfers",
            )
            return time.perf_counter() - started

    def saved(self, name: str) -> dict[str, Any] | None:
        path = self.out / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, name: str, data: Any) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(data, indent=1))

    def texts(self, split: str) -> list[str]:
        from ingest.corpus import read_corpus

        return [d.text for d in read_corpus([self.splits[split]], glob="*.rst.gz")]

    def knnlm(self, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        command = [str(ROOT / ".venv/bin/knnlm"), *args, "--json"]
        print("$ knnlm", " ".join(args), file=sys.stderr, flush=True)
        full_env = {**os.environ, **(env or {})}
        done = subprocess.run(command, env=full_env, stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    # --- stages ----------------------------------------------------------------------------

    def ingest(self) -> None:
        """The 1M collection, through the CLI (float32: the source of every other setting)."""
        env = {
            "KNNLM_DATA_DIR": str(self.work / "data"),
            "KNNLM_WINDOW": str(WINDOW),
            "KNNLM_STRIDE": str(STRIDE),
            "KNNLM_VECTOR_DATATYPE": "float32",
        }
        report = self.knnlm(
            "ingest",
            self.splits["datastore"],
            "--glob",
            "*.rst.gz",
            "--domain",
            DOMAIN,
            "--collection",
            collection("1m"),
            env=env,
        )
        self.save("ingest", report)

    def tiers(self) -> dict[str, list[str]]:
        """Document keys of each datastore size: the first files in path order."""
        cached = self.saved("tiers")
        if cached:
            return cached
        from ingest.corpus import read_corpus
        from knn_store import load_language_model
        from knn_store.store.point_ids import document_hash, document_key

        lm = load_language_model(self.settings(collection("1m")))
        docs = list(read_corpus([self.splits["datastore"]], glob="*.rst.gz"))
        tiers: dict[str, list[str]] = {name: [] for name in SIZES}
        before = 0  # datastore tokens in the files before this one
        for doc in docs:  # read_corpus sorts by name: path order, as the split made them
            key = document_key(document_hash(DOMAIN, doc.text))
            for name, limit in SIZES.items():
                if limit is None or before < limit:  # the shortest prefix reaching the size
                    tiers[name].append(key)
            before += len(lm.encode(doc.text)) - 1
        self.save("tiers", tiers)
        return tiers

    def reference(self) -> None:
        """LM outputs of validation and test (keys, targets, LM scores), and the exact
        float32 top-k of every query in every datastore size."""
        import torch

        from knn_store import open_session

        lm_path = self.out / "lm_outputs.npz"
        if not lm_path.is_file():
            with open_session(self.settings(collection("1m"))) as session:
                arrays: dict[str, np.ndarray] = {}
                for split in ("validation", "test"):
                    views = list(session.knn_lm.lm_views(session.encode(self.texts(split))))
                    arrays[f"{split}_keys"] = torch.cat([v.keys for v in views]).numpy()
                    arrays[f"{split}_targets"] = torch.cat([v.targets for v in views]).numpy()
                    for field in ("lm_target_log_prob", "lm_entropy", "lm_max_log_prob"):
                        arrays[f"{split}_{field}"] = torch.cat(
                            [getattr(v, field) for v in views]
                        ).numpy()
                np.savez(lm_path, **arrays)
        keys_path = self.out / "keys_1m.npy"
        if not keys_path.is_file():
            self._dump_keys()
        keys = np.load(keys_path, mmap_mode="r")
        tokens = np.load(self.out / "tokens_1m.npy")
        docs = np.load(self.out / "docs_1m.npy")
        lm_out = np.load(lm_path)
        tiers = self.tiers()
        for size in SIZES:
            path = self.out / f"exact_{size}.npz"
            if path.is_file():
                continue
            rows = np.flatnonzero(np.isin(docs, np.array(tiers[size])))
            print(f"exact top-{K} over {len(rows):,} keys ({size})", file=sys.stderr)
            store_keys = torch.from_numpy(np.ascontiguousarray(keys[rows]))
            out: dict[str, np.ndarray] = {"points": np.array(len(rows))}
            for split in ("validation", "test"):
                queries = torch.from_numpy(lm_out[f"{split}_keys"])
                idx, d2 = _exact_topk(store_keys, queries, K)
                out[f"{split}_sq"] = d2
                out[f"{split}_tokens"] = tokens[rows][idx]
                nearest = store_keys[torch.from_numpy(idx[:, 0])]
                out[f"{split}_cosine"] = torch.nn.functional.cosine_similarity(
                    queries, nearest, dim=-1
                ).numpy()
            np.savez(path, **out)

    def _dump_keys(self) -> None:
        """Every key, token and document key of the 1M collection, read back by scroll."""
        from knn_store import open_store
        from knn_store.store.point_ids import tokens_from_ids

        started = time.perf_counter()
        with open_store(self.settings(collection("1m"))) as store:
            n, dim = store.count(), store.meta.dim  # type: ignore[union-attr]
            keys = np.lib.format.open_memmap(
                self.out / "keys_1m.tmp.npy", mode="w+", dtype=np.float32, shape=(n, dim)
            )
            tokens, docs, at = [], [], 0
            for batch, _ in store.scroll(batch=4096):
                keys[at : at + len(batch)] = batch.keys
                at += len(batch)
                tokens.append(tokens_from_ids(batch.ids))
                docs += [p["doc"] for p in batch.payloads]
            keys.flush()
        assert at == n
        np.save(self.out / "tokens_1m.npy", np.concatenate(tokens))
        np.save(self.out / "docs_1m.npy", np.array(docs))
        (self.out / "keys_1m.tmp.npy").replace(self.out / "keys_1m.npy")
        self.save("scroll", {"points": n, "seconds": time.perf_counter() - started})

    def tuning_data(self, size: str, split: str, k: int = K):
        """A TuningData over the exact neighbours (the float32 reference)."""
        import torch

        from knn_store.lambdas import QueryFeatures
        from knn_store.tuning import TuningData

        lm_out = np.load(self.out / "lm_outputs.npz")
        exact = np.load(self.out / f"exact_{size}.npz")
        return TuningData(
            features=QueryFeatures(
                sq_distances=torch.from_numpy(exact[f"{split}_sq"][:, :k].copy()),
                token_ids=torch.from_numpy(exact[f"{split}_tokens"][:, :k].astype(np.int32)),
                lm_entropy=torch.from_numpy(lm_out[f"{split}_lm_entropy"]),
                lm_max_log_prob=torch.from_numpy(lm_out[f"{split}_lm_max_log_prob"]),
                cosine=torch.from_numpy(exact[f"{split}_cosine"]),
            ),
            targets=torch.from_numpy(lm_out[f"{split}_targets"]),
            lm_target_log_probs=torch.from_numpy(lm_out[f"{split}_lm_target_log_prob"]),
        )

    def sizes(self) -> None:
        """Per datastore size: the copy (100k, 300k), tune on validation over the exact
        neighbours (``tune_evidence``: `knnlm tune`'s rules and save), and test perplexity
        of base, paper defaults and every policy."""
        from knn_store import StorageConfig, open_session
        from knn_store.store.base import PointFilter
        from knn_store.tune_collection import TuneOptions, tune_evidence

        tiers = self.tiers()
        results = self.saved("sizes") or {}
        options = TuneOptions()  # `knnlm tune`'s defaults: buckets, a gate within 0.2%
        for size in SIZES:
            if size in results:
                continue
            name = collection(size)
            copy_seconds = None
            if size != "1m":  # float32 like the source: the exact reference
                copy_seconds = self.copy(
                    name, StorageConfig(), PointFilter(docs=tuple(tiers[size]))
                )
            validation, test = self.tuning_data(size, "validation"), self.tuning_data(size, "test")
            with open_session(self.settings(name)) as session:
                outcome = tune_evidence(session.knn_lm, validation, test, options=options)
                points = session.store.count()
            tuned, gate = outcome.result, outcome.summary["gate"]
            results[size] = {
                "points": points,
                "copy_seconds": copy_seconds,
                "sweep_seconds": tuned.sweep_seconds,
                "validation": {n: math.exp(v) for n, v in tuned.validation.items()},
                "test": {n: math.exp(v) for n, v in (tuned.test or {}).items()},
                "temperatures": {n: t.temperature for n, t in tuned.policies.items()},
                "policies": {n: t.policy.to_dict() for n, t in tuned.policies.items()},
                "held_out_change_percent": outcome.summary["held_out"]["change_percent"],
                "gate": {
                    "threshold": gate["threshold"],
                    "validation_skipped": gate["validation"]["skipped_share"],
                    "test_skipped": gate["test"]["skipped_share"],
                    "validation_perplexity": gate["validation"]["perplexity"],
                    "test_perplexity": gate["test"]["perplexity"],
                },
            }
            self.save("sizes", results)
            print(json.dumps({size: results[size]["test"]}), file=sys.stderr)

    def configs(self, only: list[str] | None) -> None:
        """Each storage setting at 1M: copy time, disk and memory per point, and per search
        setting its speed, recall and test perplexity against the exact reference."""
        from knn_store import StorageConfig

        results = self.saved("configs") or {}
        for config, fields in CONFIGS.items():
            if (only and config not in only) or config in results:
                continue
            name = collection("1m", config)
            copy_seconds = None
            if config in (previous := self.saved("configs_copies") or {}):
                copy_seconds = previous[config]  # copied before: measure only
            elif config != "f32":  # with the policy the sizes stage tuned on the source
                copy_seconds = self.copy(name, StorageConfig(**fields))
                self.save("configs_copies", {**previous, config: copy_seconds})
            measured = json.loads(
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "measure",
                        "--config",
                        config,
                        "--work",
                        str(self.work),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    check=True,
                ).stdout
            )
            results[config] = {"storage": fields, "copy_seconds": copy_seconds, **measured}
            self.save("configs", results)
            print(json.dumps({config: results[config]}, indent=1), file=sys.stderr)

    def measure_in_process(self, config: str) -> dict[str, Any]:
        """In a fresh process: disk, memory after opening the store and after each search
        setting (settings that read fewer pages come first: memory only grows), and per
        search setting ms/query, recall@k and test perplexity."""
        import torch

        from knn_store import open_store
        from knn_store.saved_policy import SavedPolicy
        from knn_store.store.config import SearchOptions

        torch.set_num_threads(2)
        name = collection("1m", config)
        with open_store(self.settings(name)) as store:  # what to run, before measuring
            quantized = store.meta.storage.quantization != "none"  # type: ignore[union-attr]
        searches = QUANTIZED_SEARCHES if quantized else SEARCHES
        # Everything this process needs is loaded, and its pages touched, before the first
        # reading: the differences are the store's own memory.
        lm_out = np.load(self.out / "lm_outputs.npz")
        queries = lm_out["test_keys"]
        exact_sq = np.load(self.out / "exact_1m.npz")["test_sq"]
        found = {
            label: (
                np.full((len(queries), K), np.inf, dtype=np.float32),
                np.full((len(queries), K), -1, dtype=np.int64),
            )
            for label, _ in searches
        }
        rss_before = _rss()
        store = open_store(self.settings(name))
        rss_open = _rss()
        seconds: dict[str, float] = {}
        memory: dict[str, dict[str, int]] = {}
        for label, fields in searches:
            options = SearchOptions(**fields)
            sq, tokens = found[label]
            store.search(queries[:64], k=K, options=options)  # warm up
            started = time.perf_counter()
            for lo in range(0, len(queries), 256):
                hits = store.search(queries[lo : lo + 256], k=K, options=options)
                sq[lo : lo + len(hits)] = hits.sq_distances
                tokens[lo : lo + len(hits)] = hits.token_ids
            seconds[label] = time.perf_counter() - started
            memory[label] = _rss()
        points = store.count()
        saved = SavedPolicy.from_dict(store.load_policy(), collection=name)
        store.close()

        def per_point(after: dict[str, int], part: str = "total") -> float:
            return (after[part] - rss_before[part]) / points

        reference = self.tuning_data("1m", "test")
        exact_nll = reference.nll(saved.policy, saved.temperature)
        rows: dict[str, Any] = {}
        for label, (sq, tokens) in found.items():
            nll = replace_neighbours(reference, sq, tokens).nll(saved.policy, saved.temperature)
            rows[label] = {
                "ms_per_query": 1000 * seconds[label] / len(queries),
                "recall": _recall(sq, exact_sq),
                "test_perplexity": math.exp(nll),
                "change_vs_exact_percent": 100 * (math.exp(nll - exact_nll) - 1),
                "memory_bytes_per_point": per_point(memory[label]),
                "memory_anon_bytes_per_point": per_point(memory[label], "anon"),
                "memory_file_bytes_per_point": per_point(memory[label], "file"),
            }
        return {
            "points": points,
            "exact_test_perplexity": math.exp(exact_nll),
            "disk_bytes_per_point": _du(self.work / "data" / name) / points,
            "memory_open_bytes_per_point": per_point(rss_open),
            "searches": rows,
        }

    def cost_of_k(self, chosen: str) -> None:
        """k = 1024, 256, 64: policies retuned on validation (exact neighbours cut to k),
        test perplexity, and search speed of the chosen setting."""
        from knn_store import open_store
        from knn_store.store.config import SearchOptions
        from knn_store.tuning import tune

        lm_out = np.load(self.out / "lm_outputs.npz")
        queries = lm_out["test_keys"]
        results = {}
        with open_store(self.settings(collection("1m", chosen))) as store:
            for k in (1024, 256, 64):
                tuned = tune(
                    self.tuning_data("1m", "validation", k), self.tuning_data("1m", "test", k)
                )
                options = SearchOptions(hnsw_ef=max(k, 2 * k if k < K else K))
                store.search(queries[:64], k=k, options=options)
                started = time.perf_counter()
                for lo in range(0, len(queries), 256):
                    store.search(queries[lo : lo + 256], k=k, options=options)
                seconds = time.perf_counter() - started
                results[k] = {
                    "test": {n: math.exp(v) for n, v in (tuned.test or {}).items()},
                    "ms_per_query": 1000 * seconds / len(queries),
                    "hnsw_ef": options.hnsw_ef,
                }
                print(json.dumps({k: results[k]}), file=sys.stderr)
        self.save("k", results)

    def throughput(self, chosen: str, search: dict[str, Any]) -> None:
        """Eval tokens/s of the base LM and of the kNN-LM on the test split, in turns of
        chunks of documents in one process, so both see the same machine: float32 at every
        size, and the chosen setting at 1M with and without the retrieval gate."""
        from knn_store import open_session, open_store

        texts = self.texts("test")
        chunks = [texts[i::3] for i in range(3)]
        results = self.saved("throughput") or {}
        with (  # the policy and gate tuned on the float32 source
            open_store(self.settings(collection("1m"))) as source,
            open_store(self.settings(collection("1m", chosen))) as target,
        ):
            target.save_policy(source.load_policy())  # type: ignore[arg-type]
        runs = [(size, "f32", True, {}) for size in SIZES]
        runs += [("1m", chosen, gate, search) for gate in (True, False)]
        for size, config, gate, changes in runs:
            extra = "".join(f", {key}={value}" for key, value in changes.items())
            label = f"{size}/{config}{extra}{'' if gate else ' (no gate)'}"
            if label in results:
                continue
            settings = self.settings(collection(size, config), gate=gate, **changes)
            with open_session(settings) as session:
                knn_lm = session.knn_lm
                base_t = knn_t = search_t = 0.0
                base_n = knn_n = searches = 0
                nll = 0.0
                for chunk in chunks:
                    seqs = session.encode(chunk)
                    started = time.perf_counter()
                    base_n += sum(len(v.targets) for v in knn_lm.lm_views(seqs))
                    base_t += time.perf_counter() - started
                    started = time.perf_counter()
                    result = knn_lm.evaluate(seqs)
                    knn_t += time.perf_counter() - started
                    knn_n += result.tokens
                    nll += result.knn_nll
                    searches += result.queries
                    search_t += result.search_seconds
                results[label] = {
                    "collection": settings.collection,
                    "base_tokens_per_s": base_n / base_t,
                    "knn_tokens_per_s": knn_n / knn_t,
                    "ratio": (knn_n / knn_t) / (base_n / base_t),
                    "knn_perplexity": math.exp(nll / knn_n),
                    "skipped_share": 1 - searches / knn_n,
                    "search_ms_per_query": 1000 * search_t / max(searches, 1),
                    "search": knn_lm.search.describe(knn_lm.k, session.store.meta.storage),  # type: ignore[union-attr]
                    "k": knn_lm.k,
                    "gate": knn_lm.gate is not None,
                }
            self.save("throughput", results)
            print(json.dumps({label: results[label]}), file=sys.stderr)

    def ingest_speed(self, chosen: str) -> None:
        """Ingest vs LM-only forward tokens/s on documents outside every split, written into
        the 1M collection in turns of chunks (then dropped again by their domain)."""
        import gzip

        import torch

        from benchmarks.kernel_docs import DOCS
        from ingest.corpus import Document
        from ingest.worker import IngestWorker
        from knn_store import PointFilter, load_language_model, open_store
        from knn_store.windows import pack_windows, window_batches

        used = set()
        manifest = json.loads((self.work / "splits.json").read_text())
        for files in manifest["files"].values():
            used.update(files)
        extra: list[Document] = []
        tokens = 0
        settings = self.settings(collection("1m", chosen))
        lm = load_language_model(settings)
        for path in sorted(DOCS.rglob("*.rst.gz"), reverse=True):  # from the other end
            rel = str(path.relative_to(DOCS))
            if rel in used:
                continue
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            n = len(lm.encode(text))
            if 200 < n < 6000:
                extra.append(Document(rel, text))
                tokens += n
            if tokens >= 24_000:
                break
        chunks = [extra[i::4] for i in range(4)]
        results = {}
        with open_store(settings) as store:
            before = store.count()
            for batch_size in (1, 4):  # windows per LM forward
                worker = IngestWorker(
                    lm,
                    store,
                    domain="ingest-speed",
                    window=WINDOW,
                    stride=STRIDE,
                    batch_size=batch_size,
                    storage=store.meta.storage,  # type: ignore[union-attr]
                )
                lm_t = ingest_t = index_t = 0.0
                lm_n = ingest_n = 0
                for chunk in chunks:
                    started = time.perf_counter()
                    for doc in chunk:
                        ids = lm.encode(doc.text)
                        for batch in window_batches(
                            [ids], window=WINDOW, stride=STRIDE, batch_size=batch_size
                        ):
                            group = [(seq, w) for _, seq, w in batch]
                            input_ids, mask = pack_windows(group, pad_id=lm.pad_id)
                            with torch.inference_mode():
                                lm.model(
                                    input_ids=torch.from_numpy(input_ids),
                                    attention_mask=torch.from_numpy(mask),
                                    use_cache=False,
                                )
                            lm_n += sum(len(w.positions) for _, w in group)
                    lm_t += time.perf_counter() - started
                    report = worker.run(chunk)
                    ingest_n += report.tokens
                    ingest_t += report.seconds
                    index_t += report.index_seconds
                dropped = store.delete(PointFilter(domains=("ingest-speed",)))
                assert store.count() == before and dropped == ingest_n
                results[batch_size] = {
                    "lm_only_tokens_per_s": lm_n / lm_t,
                    "ingest_tokens_per_s": ingest_n / ingest_t,
                    "ratio": (ingest_n / ingest_t) / (lm_n / lm_t),
                    "with_index_tokens_per_s": ingest_n / (ingest_t + index_t),
                    "tokens": ingest_n,
                }
                print(json.dumps({batch_size: results[batch_size]}), file=sys.stderr)
        self.save("ingest_speed", {"points": before, "by_batch_size": results})

    def report(self) -> None:
        from benchmarks.scale_report import write_report

        write_report(self.out, self.results, order=list(CONFIGS))


def replace_neighbours(data: Any, sq: np.ndarray, tokens: np.ndarray) -> Any:
    """The same tuning data with other neighbours (what a store returned)."""
    import torch

    from knn_store.lambdas import QueryFeatures
    from knn_store.tuning import TuningData

    f = data.features
    return TuningData(
        features=QueryFeatures(
            sq_distances=torch.from_numpy(sq),
            token_ids=torch.from_numpy(tokens.astype(np.int32)),
            lm_entropy=f.lm_entropy,
            lm_max_log_prob=f.lm_max_log_prob,
            cosine=f.cosine,
        ),
        targets=data.targets,
        lm_target_log_probs=data.lm_target_log_probs,
    )


def _exact_topk(keys: Any, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and squared distances of the k nearest keys (float32 matmul to rank, then the
    chosen candidates' distances recomputed directly, so cancellation cannot bias them)."""
    import torch

    norms = (keys * keys).sum(1)  # [n]
    out_idx, out_d2 = [], []
    for lo in range(0, len(queries), 256):
        q = queries[lo : lo + 256]
        d2 = norms[None, :] - 2 * q @ keys.T  # [b, n], + |q|^2 omitted: same order per row
        cand = d2.topk(min(2 * k, len(keys)), dim=1, largest=False).indices  # [b, 2k]
        exact = ((keys[cand] - q[:, None, :]) ** 2).sum(-1)  # [b, 2k]
        order = exact.argsort(dim=1)[:, :k]
        out_idx.append(torch.gather(cand, 1, order).numpy())
        out_d2.append(torch.gather(exact, 1, order).numpy())
    return np.concatenate(out_idx), np.concatenate(out_d2)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Distance-based recall@k: the share of the exact k-th radius a search reaches."""
    radius = exact[:, -1:]
    return float(((found <= radius * (1 + 1e-4)).sum(1) / exact.shape[1]).mean())


def _rss() -> dict[str, int]:
    """Resident memory of this process, bytes: total, anonymous and file-backed.

    Proportional set sizes (PSS): a file page mapped twice (Qdrant maps some files more
    than once) counts once, where plain RSS would count it twice."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Pss", "Pss_Anon", "Pss_File"):
            fields[name] = int(value.split()[0]) * 1024
    return {"total": fields["Pss"], "anon": fields["Pss_Anon"], "file": fields["Pss_File"]}


def _du(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
