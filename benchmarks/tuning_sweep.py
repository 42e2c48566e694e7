"""How long `knnlm tune` takes once retrieval is cached: every policy, over n tokens.

The cache is synthetic (random distances, values and LM scores of the real shapes: k
neighbours per token, a 49,152-token vocabulary), since the sweep's cost depends on the shapes
only. Prints one row per size; nothing here asserts on time.

    python benchmarks/tuning_sweep.py --tokens 12000 100000 --k 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from knn_store.lambdas import QueryFeatures
from knn_store.tuning import TuningData, tune


def synthetic(n: int, k: int, seed: int = 0) -> TuningData:
    g = torch.Generator().manual_seed(seed)
    sq = torch.sort(torch.rand(n, k, generator=g) * 40 + 2, dim=1).values
    ids = torch.randint(0, 49_152, (n, k), generator=g, dtype=torch.int32)
    targets = ids[:, 0].long().clone()
    targets[::3] = 7  # a third of the tokens: the nearest neighbour is wrong
    features = QueryFeatures(
        sq_distances=sq,
        token_ids=ids,
        lm_entropy=torch.rand(n, generator=g) * 5,
        lm_max_log_prob=-torch.rand(n, generator=g) * 3,
        cosine=torch.rand(n, generator=g),
    )
    return TuningData(features, targets, -torch.rand(n, generator=g) * 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[12_000, 100_000])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'tokens':>8} {'k':>6} {'temperatures':>12} {'sweep s':>9}")
    for n in args.tokens:
        data = synthetic(n, args.k)
        started = time.perf_counter()
        result = tune(data)
        seconds = time.perf_counter() - started
        print(f"{n:8,} {args.k:6} {len(result.curves):12} {seconds:9.2f}")


if __name__ == "__main__":
    main()
