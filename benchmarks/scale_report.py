"""Tables (``results.md``) and plots of ``benchmarks/scale.py``'s stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {
    "base": "base LM",
    "paper": "lambda 0.25, T 1",
    "fixed": "fixed lambda",
    "buckets": "64 d_min buckets",
    "cosine-buckets": "64 cosine buckets",
    "learned": "learned (MLP)",
}


def write_report(bench: Path, out: Path, *, order: list[str]) -> None:
    """``order``: the storage settings, in the order their rows are shown."""

    def load(name: str) -> Any:
        path = bench / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    lines = ["# The datastore at scale: SmolLM2-135M on the Linux kernel docs", ""]
    sizes = load("sizes")
    if sizes:
        lines += _sizes_table(sizes)
    configs = load("configs")
    if configs:
        configs = {name: configs[name] for name in order if name in configs}
        lines += _configs_table(configs)
    k = load("k")
    if k:
        lines += ["## The cost of k (1M points, policies retuned per k)", ""]
        lines += ["| k | base | paper default | 64 d_min buckets | learned | ms/query |"]
        lines += ["|---|---|---|---|---|---|"]
        for kk, row in k.items():
            t = row["test"]
            lines.append(
                f"| {kk} | {t['base']:.3f} | {t['paper']:.3f} | {t['buckets']:.3f} | "
                f"{t['learned']:.3f} | {row['ms_per_query']:.2f} |"
            )
        lines.append("")
    throughput = load("throughput")
    if throughput:
        lines += ["## Eval throughput (test split, both measured in the same run)", ""]
        lines += [
            "| datastore | k | search | gate (searches skipped) | test ppl | search ms/query "
            "| base LM tok/s | kNN-LM tok/s | ratio |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for label, row in throughput.items():
            gate = f"yes ({100 * row['skipped_share']:.0f}%)" if row["gate"] else "no"
            lines.append(
                f"| {label.split(',')[0].split(' ')[0]} | {row['k']} | {row['search']} | {gate} "
                f"| {row['knn_perplexity']:.3f} | {row['search_ms_per_query']:.2f} "
                f"| {row['base_tokens_per_s']:.0f} | {row['knn_tokens_per_s']:.0f} | "
                f"**{row['ratio']:.2f}x** |"
            )
        lines.append("")
    ingest = load("ingest_speed")
    if ingest:
        lines += [
            f"## Ingest speed into {ingest['points']:,} points (documents outside every split)",
            "",
            "| windows per forward | LM-only forward tok/s | ingest tok/s | ratio "
            "| with flush and index, tok/s |",
            "|---|---|---|---|---|",
        ]
        for batch, row in ingest["by_batch_size"].items():
            lines.append(
                f"| {batch} | {row['lm_only_tokens_per_s']:.0f} | "
                f"{row['ingest_tokens_per_s']:.0f} | **{row['ratio']:.2f}x** | "
                f"{row['with_index_tokens_per_s']:.0f} |"
            )
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plots(sizes, throughput, out)


def _sizes_table(sizes: dict[str, Any]) -> list[str]:
    names = list(sizes)
    lines = ["## Test perplexity by datastore size (exact float32 search, k=1024)", ""]
    lines += [
        "| policy (fitted on validation) | "
        + " | ".join(f"{sizes[n]['points']:,} points" for n in names)
        + " |"
    ]
    lines += ["|---|" + "---|" * len(names)]
    for policy, label in LABELS.items():
        cells = []
        for n in names:
            value, base = sizes[n]["test"][policy], sizes[n]["test"]["base"]
            change = "" if policy == "base" else f" ({100 * (value / base - 1):+.1f}%)"
            cells.append(f"{value:.3f}{change}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        g = sizes[n]["gate"]
        if g["threshold"] is None:
            cells.append("none")
        else:
            cells.append(f"{g['test_perplexity']:.3f}, {100 * g['test_skipped']:.0f}% skipped")
    lines.append("| buckets + retrieval gate | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _configs_table(configs: dict[str, Any]) -> list[str]:
    lines = ["## Storage settings at 1M points (test queries, k=1024, 2 search threads)", ""]
    lines += [
        "| setting | search | ms/query | recall@k | test ppl | vs exact | disk B/pt "
        "| memory B/pt (anon + file) | copy s |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for name, row in configs.items():
        for label, s in row["searches"].items():
            lines.append(
                f"| {name} | {label} | {s['ms_per_query']:.2f} | {s['recall']:.3f} | "
                f"{s['test_perplexity']:.3f} | {s['change_vs_exact_percent']:+.2f}% | "
                f"{row['disk_bytes_per_point']:.0f} | {s['memory_bytes_per_point']:.0f} "
                f"({s['memory_anon_bytes_per_point']:.0f} + "
                f"{s['memory_file_bytes_per_point']:.0f}) | {row['copy_seconds'] or 0:.0f} |"
            )
    lines += [
        "",
        "Memory is the process's proportional set size after opening the store and running "
        "the searches of the rows above it (each setting's rows in order, so pages read by "
        "rescoring count from the row that first read them).",
        "",
    ]
    return lines


def _plots(sizes: dict[str, Any] | None, throughput: dict[str, Any] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if sizes:
        points = [sizes[n]["points"] for n in sizes]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for policy in ("base", "paper", "fixed", "buckets", "learned"):
            ax.plot(
                points,
                [sizes[n]["test"][policy] for n in sizes],
                marker="o",
                label=LABELS[policy],
                linestyle="--" if policy == "base" else "-",
            )
        ax.set_xscale("log")
        ax.set_xlabel("datastore size (points = stored tokens)")
        ax.set_ylabel("test perplexity")
        ax.set_title("kernel docs, SmolLM2-135M: perplexity vs datastore size")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ppl_vs_datastore_size.png", dpi=120)
        plt.close(fig)
    if throughput and sizes:
        by_size = {n: sizes[n]["points"] for n in sizes}
        exact = [(lb.split("/")[0], r) for lb, r in throughput.items() if "/f32" in lb]
        xs = [by_size[size] for size, _ in exact]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.plot(xs, [r["base_tokens_per_s"] for _, r in exact], marker="o", label="base LM")
        ax.plot(
            xs,
            [r["knn_tokens_per_s"] for _, r in exact],
            marker="o",
            label="kNN-LM, float32 + HNSW, gate",
        )
        for label, row in throughput.items():
            if "/f32" not in label:
                ax.scatter(
                    [by_size[label.split("/")[0]]],
                    [row["knn_tokens_per_s"]],
                    marker="s" if row["gate"] else "x",
                    label=f"kNN-LM, {label.split('/', 1)[1]}" + (", gate" if row["gate"] else ""),
                    zorder=3,
                )
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("datastore size (points)")
        ax.set_ylabel("eval tokens/s (2 CPU cores)")
        ax.set_title("eval throughput vs datastore size")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_datastore_size.png", dpi=120)
        plt.close(fig)
