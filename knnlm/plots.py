"""PNG charts of a tuning run (matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import math
from pathlib import Path

from knn_store.errors import ConfigError
from knn_store.lambdas import BucketLambda
from knn_store.tuning import LAMBDA_GRID, TuneResult


def write_tuning_plots(result: TuneResult, folder: Path, *, title: str) -> list[Path]:
    """``perplexity_vs_lambda.png`` (one curve per T) and ``lambda_per_bucket.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "--plots needs matplotlib: pip install 'knnlm[plots]' (or matplotlib)"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    base = result.validation["base"]
    lambdas = LAMBDA_GRID.tolist()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    best_fixed = result.policies["fixed"].temperature
    cmap = plt.get_cmap("viridis")
    temps = sorted(result.curves)
    for i, t in enumerate(temps):
        best = t == best_fixed  # the chosen T stands out
        ax.plot(
            lambdas,
            result.curves[t],
            label=f"T={t:g}",
            color="crimson" if best else cmap(i / max(len(temps) - 1, 1)),
            linewidth=2.5 if best else 1.5,
        )
    ax.axhline(math.exp(base), color="grey", linestyle="--", label="base LM")
    ax.set_xlabel("lambda (fixed)")
    ax.set_ylabel("validation perplexity")
    lowest = min(min(c) for c in result.curves.values())
    ax.set_ylim(lowest * 0.97, math.exp(base) * 1.3)
    ax.set_title(f"{title}: validation perplexity per T")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    first = folder / "perplexity_vs_lambda.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)

    bucketed = {
        name: r for name, r in result.policies.items() if isinstance(r.policy, BucketLambda)
    }
    fig, axes = plt.subplots(1, len(bucketed), figsize=(5.5 * len(bucketed), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], bucketed.items(), strict=True):
        assert isinstance(r.policy, BucketLambda)
        ax.bar(range(len(r.policy.lambdas)), r.policy.lambdas, color="steelblue")
        closer = "nearest" if r.policy.feature == "d_min" else "farthest"
        ax.set_xlabel(f"bucket of {r.policy.feature} (0 = {closer} neighbours)")
        ax.set_ylabel("lambda")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}, T={r.temperature:g}")
    fig.suptitle(f"{title}: tuned lambda per bucket")
    fig.tight_layout()
    second = folder / "lambda_per_bucket.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]
