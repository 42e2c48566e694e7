"""Completion benchmark: greedy 16-token continuations of held-out lines, kNN-LM vs base LM.

Perplexity says how much probability the kNN-LM gives the right token; this asks what a user
of ``knnlm generate --sample-temperature 0`` sees: does the continuation come out right?
(Wang et al. 2023, "kNN-LM Does Not Improve Open-Ended Text Generation", found that lower
perplexity need not mean better generations, so we measure it rather than assume it.)

A held-out line is a line of a test document (never in the datastore): the prompt is the
document's own tokens up to the first token of that line, cut to the last ``--context``
tokens; the reference is the next ``--new-tokens`` tokens of the same tokenization. Lines
are chosen deterministically: among the non-blank lines that start on a token boundary,
have ``--min-context`` tokens before and ``--new-tokens`` after them, ``--prompts`` are
taken evenly spaced, in file order.

Both configurations decode through ``knn_store.generation.decode``, the loop that
``knnlm generate`` and the HTTP service use, with the collection's tuned policy as they
resolve it (``open_session``), greedily, several prompts per call. Per configuration:
exact match of all new tokens, mean number of leading tokens matched, first-token accuracy.

    KNNLM_DATA_DIR=build/kernel-docs-interleaved/data python benchmarks/continuations.py \\
        --collection kernel-docs-ffn_input --test build/kernel-docs-interleaved/test \\
        --glob '*.rst.gz' --name kernel-docs-100k
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results/continuations"


@dataclass(frozen=True)
class HeldOutLine:
    """One prompt and the tokens the document really continues it with."""

    source: str
    line: int  # 1-based line number in its document
    prompt: np.ndarray  # int64 [n], BOS first where the model has one
    reference: list[int]  # the document's next tokens


def held_out_lines(
    docs: list[tuple[str, str]],
    lm: Any,
    *,
    prompts: int,
    context: int,
    min_context: int,
    new_tokens: int,
) -> list[HeldOutLine]:
    """Every eligible line of ``docs`` (source, text), then ``prompts`` of them evenly spaced.

    Each document is tokenized whole, once, as ingest and eval see it, so a reference is what
    the document's own tokenization holds there, not a re-tokenization of a cut string.
    A line qualifies only when a token starts exactly at its first character: otherwise the
    prompt would end inside a token and no continuation could match the reference.
    """
    eligible: list[HeldOutLine] = []
    for source, text in docs:
        enc = lm.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)  # [n]
        token_at = {start: i for i, (start, _end) in enumerate(enc["offset_mapping"])}
        offset = 0
        for number, line in enumerate(text.splitlines(keepends=True), 1):
            start, offset = offset, offset + len(line)
            i = token_at.get(start)
            if not line.strip() or i is None or i < min_context or i + new_tokens > len(ids):
                continue
            prompt = np.concatenate(
                [np.asarray(lm.prefix_ids, dtype=np.int64), ids[max(0, i - context) : i]]
            )
            reference = [int(t) for t in ids[i : i + new_tokens]]
            eligible.append(HeldOutLine(source, number, prompt, reference))
    if len(eligible) <= prompts:
        return eligible
    picks = np.linspace(0, len(eligible) - 1, prompts).round().astype(int)
    return [eligible[j] for j in picks]


def score(generated: list[list[int]], lines: list[HeldOutLine]) -> dict[str, float]:
    """Exact match, mean leading tokens matched and first-token accuracy over ``lines``."""
    leading = []
    for new, line in zip(generated, lines, strict=True):
        matched = 0
        for got, want in zip(new, line.reference, strict=False):  # new may stop early at EOS
            if got != want:
                break
            matched += 1
        leading.append(matched)
    n_new = len(lines[0].reference)
    lead = np.asarray(leading)
    return {
        "exact_match": float((lead == n_new).mean()),
        "mean_leading_tokens": float(lead.mean()),
        "first_token_accuracy": float((lead >= 1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", required=True, help="the collection to retrieve from")
    parser.add_argument("--test", type=Path, required=True, help="folder of held-out documents")
    parser.add_argument("--glob", default="**/*", help="which files of --test to read")
    parser.add_argument("--name", required=True, help="results are written as <name>.json/.md")
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--context", type=int, default=256, help="prompt tokens at most")
    parser.add_argument("--min-context", type=int, default=32, help="prompt tokens at least")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="prompts per decode call")
    parser.add_argument("--exact", action="store_true", help="exact (full-scan) search")
    args = parser.parse_args()

    from ingest.corpus import read_corpus
    from knn_store import open_session
    from knn_store.generation import Sampling, decode
    from knn_store.settings import KnnlmSettings

    settings = KnnlmSettings(collection=args.collection, exact=args.exact)
    docs = [(d.source, d.text) for d in read_corpus([args.test], glob=args.glob)]
    results: dict[str, Any] = {
        "command": command_line(),
        "data_dir": str(settings.data_dir),
        "collection": args.collection,
        "test": str(args.test),
        "documents": len(docs),
        "context": args.context,
        "new_tokens": args.new_tokens,
        "configurations": {},
    }
    with open_session(settings) as session:
        lines = held_out_lines(
            docs,
            session.lm,
            prompts=args.prompts,
            context=args.context,
            min_context=args.min_context,
            new_tokens=args.new_tokens,
        )
        if not lines:
            raise SystemExit(
                f"no eligible lines in {args.test}: lower --min-context or --new-tokens"
            )
        results["prompts"] = len(lines)
        results["mean_prompt_tokens"] = float(np.mean([len(x.prompt) for x in lines]))
        results["policy"] = session.resolved.policy.to_dict()
        results["temperature"] = session.resolved.temperature
        results["policy_source"] = session.resolved.source
        print(f"{len(lines)} held-out lines from {len(docs)} documents; {session.describe()}")
        generated: dict[str, list[list[int]]] = {}
        for knn in (False, True):
            label = "kNN-LM" if knn else "base LM"
            sampling = Sampling(temperature=0, max_new_tokens=args.new_tokens, knn=knn)
            started = time.perf_counter()
            outputs: list[list[int]] = []
            for b in range(0, len(lines), args.batch):
                chunk = lines[b : b + args.batch]
                outputs += decode(
                    session.knn_lm, [x.prompt for x in chunk], [sampling] * len(chunk)
                )
            seconds = time.perf_counter() - started
            generated[label] = outputs
            results["configurations"][label] = {
                **score(outputs, lines),
                "seconds": round(seconds, 1),
            }
            print(f"{label}: {results['configurations'][label]}", flush=True)
        tokenizer = session.lm.tokenizer
        results["examples"] = [  # a few rows where the two differ, to read what changed
            {
                "source": x.source,
                "line": x.line,
                "reference": tokenizer.decode(x.reference),
                "base LM": tokenizer.decode(base),
                "kNN-LM": tokenizer.decode(knn),
            }
            for x, base, knn in zip(lines, generated["base LM"], generated["kNN-LM"], strict=True)
            if base != knn
        ][:10]
        results["differing_continuations"] = sum(
            a != b for a, b in zip(generated["base LM"], generated["kNN-LM"], strict=True)
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


def command_line() -> str:
    """How this run was started, with the environment settings that chose the data."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("KNNLM_")]
    return " ".join([*env, shlex.join(["python", *sys.argv])])


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table, with the command that made them."""
    n = results["new_tokens"]
    out = [
        f"# Greedy {n}-token continuations: {results['collection']}",
        "",
        f"{results['prompts']} held-out lines from {results['documents']} test documents, "
        f"prompts of {results['mean_prompt_tokens']:.0f} tokens on average "
        f"(at most {results['context']}); kNN-LM with the {results['policy_source']} policy "
        f"(T = {results['temperature']:g}). {results['differing_continuations']} of "
        f"{results['prompts']} continuations differ between the two.",
        "",
        f"| configuration | exact match ({n} tokens) | mean leading tokens matched "
        "| first-token accuracy | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results["configurations"].items():
        out.append(
            f"| {label} | {r['exact_match']:.1%} | {r['mean_leading_tokens']:.2f} "
            f"| {r['first_token_accuracy']:.1%} | {r['seconds']} |"
        )
    out += [
        "",
        f"Data dir `{results['data_dir']}`. Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
