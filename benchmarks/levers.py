"""Each lever of issue 16 alone and all together, on held-out text (fit on validation only).

For a corpus split by file into datastore, validation and test, it runs what a user runs:

    knnlm ingest <datastore>                                   # memorize (exact search)
    knnlm rebuild --to-collection <name>-succ --successors     # link successors (no LM)
    knnlm tune <validation> --test <test> --save <policy> --fit-levers --pointer-budget B
    knnlm eval <test> [--no-gate] [--pointer-min 0] [--cache-weight 0]   # one per lever

``tune`` fits T, lambda (every policy, the learned per-position temperature included: its
test column is that lever alone), the retrieval gate, the document cache and the pointer
threshold on the validation split alone; the test split only reports. The evals use the
saved policy (``--save``, default ``learned-t``). The table gives, per configuration, test
perplexity and its change against the base LM, top-1 next-token accuracy, the share of
searches saved (gate skips plus followed pointers), and the kNN-LM's throughput relative to
the base LM's measured in the same eval (LM seconds over LM plus retrieval seconds: the
overlap of search with the next forward is not counted, so the ratio is a lower bound).

    python benchmarks/kernel_docs.py --key-types ffn_input      # the kernel-docs collection
    python benchmarks/levers.py kernel-docs                     # ~40 min on 2 cores
    python benchmarks/levers.py stdlib --datastore-tokens 50000 # the Python standard library

Steps are resumable: ingest skips stored documents, and the rebuild and the tune are skipped
when their outputs exist (``--force`` redoes the tune and the evals, ``--redo-evals`` the
evals).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.kernel_docs import DOCS, make_splits  # noqa: E402
from benchmarks.paths import relative  # noqa: E402

CORPORA = {
    # name: (folder, file pattern, folders to skip, domain tag)
    "kernel-docs": (DOCS, "*.rst.gz", (), "kernel-docs"),
    "stdlib": (
        Path(sysconfig.get_paths()["stdlib"]),
        "*.py",
        ("site-packages", "dist-packages", "__pycache__"),
        "python-stdlib",
    ),
}

# (label, eval flags): every lever alone on top of the tuned policy, then all of them
CONFIGS = [
    ("kNN-LM (tuned policy, no lever)", ["--no-gate", "--pointer-min", "0", "--cache-weight", "0"]),
    ("+ retrieval gate", ["--pointer-min", "0", "--cache-weight", "0"]),
    ("+ pointer following", ["--no-gate", "--cache-weight", "0"]),
    ("+ document cache", ["--no-gate", "--pointer-min", "0"]),
    ("all levers", []),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--work", type=Path, help="default: build/<corpus>-interleaved")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/levers/<corpus>")
    parser.add_argument("--datastore-tokens", type=int, default=100_000)
    parser.add_argument("--eval-tokens", type=int, default=12_000, help="per held-out split")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=1024)
    parser.add_argument(
        "--save", default="learned-t", help="the policy tune saves, which every eval uses"
    )
    parser.add_argument("--pointer-budget", type=float, default=0.2, help="percent")
    parser.add_argument("--force", action="store_true", help="redo the tune and the evals")
    parser.add_argument("--redo-evals", action="store_true", help="redo the evals only")
    parser.add_argument(
        "--prepare-only", action="store_true", help="stop after the ingest and the rebuild"
    )
    args = parser.parse_args()
    folder, pattern, skip, domain = CORPORA[args.corpus]
    work = args.work or ROOT / "build" / f"{args.corpus}-interleaved"
    out = args.out or ROOT / "benchmarks/results/levers" / args.corpus
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(
        work,
        "interleaved",
        args.datastore_tokens,
        args.eval_tokens,
        docs=folder,
        pattern=pattern,
        skip=skip,
    )
    # the kernel-docs collection of benchmarks/kernel_docs.py, or this corpus' own
    collection = "kernel-docs-ffn_input" if args.corpus == "kernel-docs" else args.corpus
    env = {
        **os.environ,
        "KNNLM_DATA_DIR": str(work / "data"),
        "KNNLM_WINDOW": str(args.window),
        "KNNLM_STRIDE": str(args.stride),
        "KNNLM_TOP_K": str(args.top_k),
        "KNNLM_EXACT": "true",  # exact search: the levers, not the index, make the difference
        "KNNLM_KEY_TYPE": "ffn_input",
    }
    glob = ["--glob", pattern]
    if not (work / "data" / collection).is_dir() or args.corpus != "kernel-docs":
        knnlm(
            env,
            collection,
            out / "ingest.json",
            "ingest",
            splits["datastore"],
            "--domain",
            domain,
            *glob,
        )
    linked = f"{collection}-succ"
    if not (work / "data" / linked).is_dir():
        knnlm(env, collection, None, "rebuild", "--to-collection", linked, "--successors")
    if args.prepare_only:
        return
    tune_report = out / "tune.json"
    if args.force or not tune_report.is_file():
        knnlm(
            env,
            linked,
            tune_report,
            "tune",
            splits["validation"],
            "--test",
            splits["test"],
            *glob,
            "--save",
            args.save,
            "--fit-levers",
            "--pointer-budget",
            str(args.pointer_budget),
        )
    rows = []
    for label, flags in CONFIGS:
        report = out / f"eval-{slug(label)}.json"
        if args.force or args.redo_evals or not report.is_file():
            knnlm(env, linked, report, "eval", splits["test"], *glob, *flags)
        rows.append((label, flags, json.loads(report.read_text())))
    tune = json.loads(tune_report.read_text())
    write_table(out, args, work, rows, tune, json.loads((work / "splits.json").read_text()))


def env_shown(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """The settings every command of a run gets through the environment (paths relative)."""
    return {
        "KNNLM_DATA_DIR": relative(str(work / "data")),
        "KNNLM_WINDOW": str(args.window),
        "KNNLM_STRIDE": str(args.stride),
        "KNNLM_TOP_K": str(args.top_k),
        "KNNLM_EXACT": "true",
        "KNNLM_KEY_TYPE": "ffn_input",
    }


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def knnlm(env: dict[str, str], collection: str, report: Path | None, *args: str) -> dict:
    """Run one CLI command on ``collection``; its --json answer lands in ``report``."""
    command = [str(ROOT / ".venv/bin/knnlm"), *args, "--collection", collection, "-q"]
    if report is not None:
        command.append("--json")
    shown = [relative(a) if a.startswith("/") else shlex.quote(a) for a in command[1:]]
    print("$ knnlm", " ".join(shown), file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    data = json.loads(done.stdout) if report is not None else {}
    data["wall_seconds"] = time.perf_counter() - started
    data["command"] = "knnlm " + " ".join(shown)
    if report is not None:
        report.write_text(json.dumps(data, indent=1) + "\n")
    return data


def write_table(
    out: Path, args: argparse.Namespace, work: Path, rows: list, tune: dict, splits: dict
) -> None:
    tokens = splits["tokens"]
    linked = tune["collection"]
    source = linked.removesuffix("-succ")
    first = rows[0][2]
    lines = [
        f"# Levers of issue 16 on {args.corpus}",
        "",
        f"SmolLM2-135M, `ffn_input` keys, {tokens['datastore']:,} datastore tokens, k = "
        f"{args.top_k}, exact search, window {args.window} / stride {args.stride}. Fitted on "
        f"{tokens['validation']:,} validation tokens; reported on {first['tokens']:,} test "
        f"tokens. Base LM: test perplexity {first['base_perplexity']:.3f}, top-1 "
        f"{first['base_top1']:.4f}. Every eval uses the policy `tune` saved "
        f"(`{tune.get('saved', args.save)}`) with its T; throughput is LM seconds over LM plus "
        "retrieval seconds within each eval, a lower bound (retrieval overlaps the next "
        "forward).",
        "",
        "| configuration | test ppl | change vs base | top-1 | searches saved | "
        "kNN-LM / LM throughput |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, e in rows:
        throughput = e["lm_seconds"] / (e["lm_seconds"] + e["search_seconds"])
        lines.append(
            f"| {label} | {e['knn_perplexity']:.3f} | {e['change_percent']:+.1f}% | "
            f"{e['knn_top1']:.4f} | {100 * e['skipped_share']:.1f}% | {throughput:.2f}x |"
        )
    lines += ["", "Policies fitted by `tune` (validation / test perplexity):", ""]
    lines += ["| policy | T | validation | test |", "|---|---|---|---|"]
    for name, p in tune["policies"].items():
        t = "-" if p.get("temperature") is None else f"{p['temperature']:.3g}"
        lines.append(
            f"| {name} | {t} | {p['validation_perplexity']:.3f} | "
            f"{p.get('test_perplexity', float('nan')):.3f} |"
        )
    levers = tune.get("levers", {})
    if levers:
        lines += [
            "",
            "Levers fitted on validation: "
            + json.dumps(
                {
                    k: levers[k]
                    for k in ("cache_weight", "cache_temperature", "pointer_min")
                    if k in levers
                }
            ),
        ]
    lines += ["", "Commands (from the repository root; `levers.py` runs the others with the"]
    lines += ["environment of its second line):", "", "```"]
    lines += [f"python benchmarks/levers.py {args.corpus}"]
    lines += [" ".join(f"{k}={v}" for k, v in sorted(env_shown(args, work).items()))]
    lines += [f"knnlm rebuild --to-collection {linked} --successors --collection {source}"]
    lines += [tune["command"], *(e["command"] for _, _, e in rows), "```", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
