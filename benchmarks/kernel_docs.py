"""Perplexity benchmark: SmolLM2-135M on the Linux kernel docs (Debian's ``linux-doc-6.1``).

The ``.rst.gz`` files are split by file into datastore, validation and test, in one of two ways:

- ``interleaved`` (default): files in path order, every tenth to test and every tenth (offset
  by five) to validation, the rest to the datastore, until the datastore holds 100k tokens.
  Datastore and held-out files then come from the same subsystems' documentation: the
  domain-adaptation setting a kNN-LM is for.
- ``random``: files in the order of a hash of their path, so the 100k-token datastore is a
  random 2% sample of the docs and the held-out files are mostly about other subsystems.

For each key type the script runs the CLI a user would run:

    knnlm ingest <datastore>                      # memorize
    knnlm tune <validation> --test <test>         # sweep T, lambda and the policies; save
    knnlm eval <test>                             # the saved policy, on unseen text

and writes ``results/kernel_docs/`` (a markdown table, the JSON reports and the tuning plots).
Every step is resumable: ingest skips stored documents, and the split is a pure function of
the file names, so rerunning after an interruption redoes only what is missing.

    python benchmarks/kernel_docs.py                 # both key types, about 35 min on 2 cores
    python benchmarks/kernel_docs.py --key-types final --datastore-tokens 20000
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
SPLITS = ("test", "validation", "datastore")
MAX_FILE_TOKENS = 6000  # longer files would let a handful of documents make up a split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["interleaved", "random"], default="interleaved")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DOCS,
        help="the Documentation folder of .rst.gz files (default: linux-doc-6.1's)",
    )
    parser.add_argument("--work", type=Path, help="default: build/kernel-docs-<split>")
    parser.add_argument("--results", type=Path, help="default: results/kernel_docs/<split>")
    parser.add_argument("--datastore-tokens", type=int, default=100_000)
    parser.add_argument("--eval-tokens", type=int, default=12_000, help="per eval split")
    parser.add_argument("--key-types", nargs="+", default=["ffn_input", "final"])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument(
        "--stages", default="ingest,tune,eval", help="comma-separated subset of ingest,tune,eval"
    )
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    args.work = args.work or ROOT / "build" / f"kernel-docs-{args.split}"
    args.results = args.results or ROOT / "benchmarks/results/kernel_docs" / args.split

    split_files = make_splits(
        args.work, args.split, args.datastore_tokens, args.eval_tokens, docs=args.corpus
    )
    args.results.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "KNNLM_DATA_DIR": str(args.work / "data"),
        "KNNLM_WINDOW": str(args.window),
        "KNNLM_STRIDE": str(args.stride),
        "KNNLM_EXACT": "true",  # the targets were measured with exact search
    }
    for key_type in args.key_types:
        env["KNNLM_KEY_TYPE"] = key_type
        env["KNNLM_COLLECTION"] = f"kernel-docs-{key_type}"
        out = args.results / key_type
        out.mkdir(parents=True, exist_ok=True)
        if "ingest" in stages:
            knnlm(
                env,
                out / "ingest.json",
                "ingest",
                split_files["datastore"],
                "--domain",
                "kernel-docs",
            )
        if "tune" in stages:
            knnlm(
                env,
                out / "tune.json",
                "tune",
                split_files["validation"],
                "--test",
                split_files["test"],
                "--plots",
                str(out),
            )
        if "eval" in stages:
            knnlm(env, out / "eval.json", "eval", split_files["test"])
    if "tune" in stages:
        write_table(args.results, args.key_types)


def make_splits(
    work: Path,
    how: str,
    datastore_tokens: int,
    eval_tokens: int,
    *,
    docs: Path = DOCS,
    pattern: str = "*.rst.gz",
    skip: tuple[str, ...] = (),
) -> dict[str, str]:
    """Copy the files under ``docs`` matching ``pattern`` (gzipped or plain text; none under
    a folder named in ``skip``) into work/<split>/: a pure function of the file names."""
    manifest = work / "splits.json"
    wanted = {"split": how, "datastore_tokens": datastore_tokens, "eval_tokens": eval_tokens}
    if pattern != "*.rst.gz":  # the kernel docs' manifests predate these two
        wanted |= {"pattern": pattern, "skip": list(skip)}
    if manifest.is_file() and json.loads(manifest.read_text())["wanted"] == wanted:
        return {s: str(work / s) for s in SPLITS}
    if not docs.is_dir():
        sys.exit(f"{docs} is missing: run `apt-get install linux-doc-6.1` first")
    from knn_store.lm import load_language_model
    from knn_store.settings import KnnlmSettings

    tokenizer = load_language_model(KnnlmSettings()).tokenizer  # the default model's

    files = sorted(
        p for p in docs.rglob(pattern) if not set(p.relative_to(docs).parts[:-1]) & set(skip)
    )
    if how == "random":
        files.sort(key=lambda p: hashlib.sha256(str(p.relative_to(docs)).encode()).hexdigest())
    targets = {"test": eval_tokens, "validation": eval_tokens, "datastore": datastore_tokens}
    counts = dict.fromkeys(SPLITS, 0)
    chosen: dict[str, list[Path]] = {s: [] for s in SPLITS}
    shutil.rmtree(work, ignore_errors=True)
    for i, path in enumerate(files):
        if all(counts[s] >= targets[s] for s in SPLITS):
            break
        if how == "random":  # fill test, then validation, then the datastore
            split = next(s for s in SPLITS if counts[s] < targets[s])
        else:
            split = {0: "test", 5: "validation"}.get(i % 10, "datastore")
            if counts[split] >= targets[split]:
                continue
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode(
            "utf-8", errors="replace"
        )
        n = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if n == 0 or n > MAX_FILE_TOKENS:
            continue
        counts[split] += n
        chosen[split].append(path)
        dest = work / split / str(path.relative_to(docs)).replace("/", "__")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    report = {
        "wanted": wanted,
        "tokens": counts,
        "files": {s: [str(p.relative_to(docs)) for p in chosen[s]] for s in SPLITS},
    }
    manifest.write_text(json.dumps(report, indent=1))
    print(f"splits (tokens): {counts}", file=sys.stderr)
    return {s: str(work / s) for s in SPLITS}


def knnlm(env: dict[str, str], report: Path, *args: str) -> dict:
    command = [str(ROOT / ".venv/bin/knnlm"), *args, "--glob", "*.rst.gz", "--json"]
    print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    data = json.loads(done.stdout)
    if "plots" in data:  # committed results name files relative to the repository
        data["plots"] = [_relative(p) for p in data["plots"]]
    report.write_text(json.dumps(data) + "\n")
    return data


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def write_table(results: Path, key_types: list[str]) -> None:
    """results.md: perplexity per policy on test (and validation), per key type."""
    names = ["base", "paper", "fixed", "buckets", "cosine-buckets", "learned"]
    labels = {
        "base": "base LM",
        "paper": "lambda 0.25, T 1",
        "fixed": "fixed lambda",
        "buckets": "64 d_min buckets",
        "cosine-buckets": "64 cosine buckets",
        "learned": "learned (MLP, 5 features)",
    }
    lines = ["# SmolLM2-135M + kNN-LM on the Linux kernel docs", ""]
    for split in ("test", "validation"):
        lines += [f"## Perplexity on the {split} split", ""]
        lines.append("| policy | " + " | ".join(key_types) + " |")
        lines.append("|---|" + "---|" * len(key_types))
        tunes = {k: json.loads((results / k / "tune.json").read_text()) for k in key_types}
        for name in names:
            cells = []
            for k in key_types:
                row = tunes[k]["policies"][name]
                value = row[f"{split}_perplexity"]
                base = tunes[k]["policies"]["base"][f"{split}_perplexity"]
                extra = ""
                if name == "fixed":
                    extra = f", lambda {row['policy']['lambda']:.2f}"
                if row["temperature"] is not None and name != "base":
                    extra = f" (T {row['temperature']:.3g}{extra})"
                change = "" if name == "base" else f" **{100 * (value / base - 1):+.1f}%**"
                cells.append(f"{value:.3f}{change}{extra}")
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
        lines.append("")
    evaluated = [k for k in key_types if (results / k / "eval.json").is_file()]
    if evaluated:
        lines += ["## `knnlm eval` on test with the saved policy", ""]
        lines.append("| key type | policy | base | kNN-LM | change | search ms/query |")
        lines.append("|---|---|---|---|---|---|")
    for k in evaluated:
        e = json.loads((results / k / "eval.json").read_text())
        lines.append(
            f"| {k} | {e['policy']['kind']} (T {e['temperature']:.3g}) | "
            f"{e['base_perplexity']:.3f} | {e['knn_perplexity']:.3f} | "
            f"{e['change_percent']:+.1f}% | {e['search_ms_per_query']:.2f} |"
        )
    lines.append("")
    lines += ["## Tuning cost", ""]
    for k in key_types:
        t = json.loads((results / k / "tune.json").read_text())
        lines.append(
            f"- {k}: retrieval {t['retrieve_seconds']:.0f} s for {t['validation_tokens']:,} "
            f"validation + {t['test_tokens']:,} test tokens; sweep of every policy "
            f"{t['sweep_seconds']:.2f} s"
        )
    (results / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
