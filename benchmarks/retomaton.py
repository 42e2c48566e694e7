"""Pointer following (RetoMaton) and the document cache on a kernel-docs collection (issue 16).

One LM pass over the validation and the test texts feeds every configuration at once: the
kNN-LM as tuned (the collection's saved policy, gate off), the same with pointer following at
several thresholds (a position with fewer pointers than the threshold searches and scores
the union of the search's neighbours and its pointers, as RetoMaton does), and each with the
document cache. The cache's temperature and weight are
fitted on validation only (a grid, by validation perplexity) and reported on test. For each
it reports perplexity, the share of searches saved (overall and per text), and top-1
next-token accuracy (the argmax of the full mixed distribution, on test).

    python benchmarks/kernel_docs.py --key-types ffn_input          # the collection (once)
    python benchmarks/retomaton.py --thresholds 1 8 64 --max-tokens 3000 \
        --out benchmarks/results/pointers/kd-100k-union            # this table

The collection is copied first (``build/retomaton/``) and linked with
``copy_collection(successors=True)``, what ``knnlm rebuild --successors`` runs, so the
source is never opened while another benchmark uses it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.paths import relative  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build/kernel-docs-interleaved")
    parser.add_argument("--collection", default="kernel-docs-ffn_input")
    parser.add_argument("--copy-to", type=Path, default=ROOT / "build/retomaton")
    parser.add_argument("--thresholds", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--top-k", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per LM forward")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=0, help="per split (0: all)")
    parser.add_argument("--glob", default="*.rst.gz")
    parser.add_argument("--model", help="default: the settings' (SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pointers")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from ingest.corpus import read_corpus
    from knn_store import KnnlmSettings, open_session, open_store
    from knn_store.store.transfer import copy_collection

    linked = f"{args.collection}-succ"
    model = {"model": args.model} if args.model else {}
    data = args.copy_to / "data"
    if not (data / linked).exists():
        if not (data / args.collection).exists():
            shutil.copytree(args.work / "data" / args.collection, data / args.collection)

        def settings_for(name: str) -> KnnlmSettings:
            return KnnlmSettings(data_dir=data, collection=name, **model)

        started = time.perf_counter()
        with (
            open_store(settings_for(args.collection)) as source,
            open_store(settings_for(linked), create=True) as target,
        ):
            report = copy_collection(source, target, successors=True)
        print(f"linked {report.points:,} points in {time.perf_counter() - started:.0f} s")
    settings = KnnlmSettings(
        data_dir=data,
        collection=linked,
        window=args.window,
        stride=args.stride,
        top_k=args.top_k,
        exact=True,  # as the tuned policy was fitted
        gate=False,  # searches saved by pointers alone
        batch_size=args.batch_size,
        **model,
    )
    splits = {}
    with open_session(settings) as session:
        for split in ("validation", "test"):
            texts = [d.text for d in read_corpus([args.work / split], glob=args.glob)]
            splits[split] = session.encode(texts)
            if args.max_tokens:
                splits[split] = _truncate(splits[split], args.max_tokens)
        results = run(session, splits, args.thresholds)
        results["policy"] = session.resolved.policy.to_dict()
        results["policy_source"] = session.resolved.source
        results["temperature"] = session.resolved.temperature
    results["settings"] = relative({k: str(v) for k, v in vars(args).items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retomaton.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "retomaton.md").write_text(table(results))
    print(table(results))


def _truncate(seqs: list[np.ndarray], budget: int) -> list[np.ndarray]:
    """Each text cut to an equal share of ``budget`` tokens: every text stays, so pointer
    following still steps through several texts at once."""
    share = max(2, budget // max(1, len(seqs)))
    return [s[: share + 1] for s in seqs]


CACHE_T = (0.25, 0.5, 1.0, 2.0, 4.0)  # times the kNN's T
CACHE_W = (0.02, 0.05, 0.1, 0.2, 0.3)


def run(session, splits: dict[str, list[np.ndarray]], thresholds: list[int]) -> dict:
    """Every configuration over both splits in one LM pass per split."""
    from knn_store.doc_cache import CacheState, DocumentCache
    from knn_store.pointers import PointerState

    base = session.knn_lm
    configs = {"kNN-LM": base} | {
        f"pointers >= {t}": base.with_options(pointer_min=t) for t in thresholds
    }
    t_knn = base.temperature
    out: dict = {"splits": {}}
    chosen: tuple[float, float] | None = None
    for split, seqs in splits.items():
        full = split == "test"
        # window j of several texts per batch: more texts step together (see KnnLM
        # ._search_or_follow); each text's windows still come in order
        groups = base.window_batches(seqs, interleave=True)
        pstate = {name: PointerState() for name in configs}
        temps = [t_knn * f for f in CACHE_T] if chosen is None else [chosen[0]]
        weights = CACHE_W if chosen is None else (chosen[1],)
        cstate = {t: CacheState() for t in temps}
        acc = {
            name: {
                "nll": 0.0,
                "searches": 0,
                "followed": 0,
                "top1": 0,
                "cache_nll": np.zeros((len(temps), len(weights))),
                "cache_top1": 0,
                "per_text": {},
            }
            for name in configs
        }
        lm_acc = {"nll": 0.0, "top1": 0, "tokens": 0}
        seconds = dict.fromkeys(configs, 0.0)
        started = time.perf_counter()
        for g, group in enumerate(groups):
            view = base.lm_view(group, full=full)
            lm_acc["nll"] -= view.lm_target_log_prob.double().sum().item()
            lm_acc["tokens"] += len(view.targets)
            if full:
                lm_acc["top1"] += int((view.lm_log_probs.argmax(-1) == view.targets).sum())
            caches = {
                t: DocumentCache(temperature=t, weight=0.0).target_log_probs(
                    cstate[t],
                    sequence=view.sequence,
                    position=view.position,
                    keys=view.keys,
                    targets=view.targets,
                    vocab_size=session.lm.vocab_size,
                    full=full,
                )
                for t in temps
            }
            for name, knn in configs.items():
                t0 = time.perf_counter()
                scored = knn.finish(view, full=full, use_gate=False, pointers=pstate[name])
                seconds[name] += time.perf_counter() - t0
                a = acc[name]
                a["nll"] -= scored.log_prob.double().sum().item()
                a["searches"] += int(scored.searched.sum())
                followed = (
                    scored.followed
                    if scored.followed is not None
                    else torch.zeros_like(scored.searched)
                )
                a["followed"] += int(followed.sum())
                for s in np.unique(view.sequence):
                    rows = torch.from_numpy(view.sequence == s)
                    n, f = a["per_text"].get(int(s), (0, 0))
                    a["per_text"][int(s)] = (n + int(rows.sum()), f + int(followed[rows].sum()))
                for ti, t in enumerate(temps):
                    c = caches[t]
                    for wi, w in enumerate(weights):
                        mixed = DocumentCache(temperature=t, weight=w).mix(
                            scored.log_prob, c.target_log_prob, c.has_memory
                        )
                        a["cache_nll"][ti, wi] -= mixed.double().sum().item()
                if full:
                    assert scored.log_probs is not None
                    a["top1"] += int((scored.log_probs.argmax(-1) == view.targets).sum())
                    c = caches[temps[0]]
                    mixed = DocumentCache(temperature=temps[0], weight=weights[0]).mix(
                        scored.log_probs, c.log_probs, c.has_memory
                    )
                    a["cache_top1"] += int((mixed.argmax(-1) == view.targets).sum())
            print(
                f"{split}: batch {g + 1}/{len(groups)}, {lm_acc['tokens']:,} tokens, "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
        n = lm_acc["tokens"]
        res: dict = {
            "tokens": n,
            "base_lm_perplexity": float(np.exp(lm_acc["nll"] / n)),
            "base_lm_top1": lm_acc["top1"] / n if full else None,
            "configs": {},
        }
        for name, a in acc.items():
            shares = [f / t for t, f in a["per_text"].values() if t]
            best = np.unravel_index(np.argmin(a["cache_nll"]), a["cache_nll"].shape)
            res["configs"][name] = {
                "perplexity": float(np.exp(a["nll"] / n)),
                "searches": a["searches"],
                "followed": a["followed"],
                "searches_saved_share": a["followed"] / n,
                "per_text_saved_share": {
                    "texts": len(shares),
                    "min": float(np.min(shares)),
                    "median": float(np.median(shares)),
                    "max": float(np.max(shares)),
                },
                "pointer_lookups": pstate[name].lookups,
                "points_looked_up": pstate[name].looked_up,
                "searches_united_with_pointers": pstate[name].united,
                "pointers_added_by_unions": pstate[name].added,
                "seconds": seconds[name],
                "top1": a["top1"] / n if full else None,
                "cache_perplexity": float(np.exp(a["cache_nll"][best] / n)),
                "cache_temperature": temps[best[0]],
                "cache_weight": weights[best[1]],
                "cache_top1": a["cache_top1"] / n if full else None,
            }
        if chosen is None:  # fitted on validation (on the tuned kNN-LM), applied to test
            c = res["configs"]["kNN-LM"]
            chosen = (c["cache_temperature"], c["cache_weight"])
        out["splits"][split] = res
    out["cache_fitted_on_validation"] = {"temperature": chosen[0], "weight": chosen[1]}
    return out


def table(results: dict) -> str:
    test, valid = results["splits"]["test"], results["splits"]["validation"]
    lines = [
        f"Test {test['tokens']:,} tokens; base LM perplexity {test['base_lm_perplexity']:.3f}, "
        f"top-1 {test['base_lm_top1']:.4f}. Cache T and weight fitted on validation: "
        f"{results['cache_fitted_on_validation']}.",
        "",
        "| configuration | valid ppl | test ppl | test searches saved | per-text saved "
        "(min / median / max) | test top-1 | + cache: valid ppl | test ppl | test top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in test["configs"].items():
        v = valid["configs"][name]
        p = c["per_text_saved_share"]
        lines.append(
            f"| {name} | {v['perplexity']:.3f} | {c['perplexity']:.3f} | "
            f"{100 * c['searches_saved_share']:.1f}% | {100 * p['min']:.0f}% / "
            f"{100 * p['median']:.0f}% / {100 * p['max']:.0f}% | {c['top1']:.4f} | "
            f"{v['cache_perplexity']:.3f} | {c['cache_perplexity']:.3f} | {c['cache_top1']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
