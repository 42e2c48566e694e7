"""`knnlm tune`, then `eval`, `generate` and `explain` with the saved policy, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CORPUS_LINES
from tests.test_cli import Knnlm, _json_ok, _one_line_error

VALIDATION = [
    "def add(x, y):\n    return x + y\n",
    "def mul(x, y):\n    return x * y\nfor j in range(5):\n    print(j, j * j)\n",
    "class Queue:\n    def push(self, item):\n        self.items.append(item)\n",
    # tune refuses less than 32 tokens per bucket and 256 for the learned policy
    "def parse(line):\n    key, value = line.split('=')\n    return key.strip(), value\n",
    "while queue:\n    node = queue.pop()\n    for child in node.children:\n"
    "        queue.append(child)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    # ... with one fold of 4 held out (342 tokens in all for the learned policy)
    "def area(width, height):\n    total = width * height\n    return total\n",
    "for name in names:\n    if name.startswith('_'):\n        continue\n    print(name.upper())\n",
]
TEST = [
    "def sub(a, b):\n    return a - b\n",
    "import sys\nprint(sys.argv)\nThe quick brown fox jumps.\n",
]


@pytest.fixture
def knnlm(tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path) -> Knnlm:
    runner = Knnlm(tmp_path, tiny_models["llama"])
    _json_ok(runner.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    return runner


@pytest.fixture
def splits(tmp_path: Path) -> tuple[Path, Path]:
    folders = []
    for name, texts in (("validation", VALIDATION), ("test", TEST)):
        folder = tmp_path / name
        folder.mkdir()
        for i, text in enumerate(texts):
            (folder / f"{i}.txt").write_text(text)
        folders.append(folder)
    return folders[0], folders[1]


def _run(knnlm: Knnlm, command: str, *args: str) -> Any:
    # generate has no windows: it feeds the whole prompt
    model = ["--model", str(knnlm.model)] if command == "generate" else knnlm.model_args()
    return knnlm(command, *model, *knnlm.store_args(), "--top-k", "8", *args)


@pytest.mark.parametrize("kind", ["fixed", "buckets", "cosine-buckets", "learned"])
def test_tune_then_eval_reproduces_the_test_perplexity(
    knnlm: Knnlm, splits: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    validation, test = splits
    plots = tmp_path / "plots"
    report = _json_ok(
        _run(
            knnlm,
            "tune",
            str(validation),
            "--test",
            str(test),
            "--exact",
            "--buckets",
            "4",
            "--save",
            kind,
            "--plots",
            str(plots),
            "-q",
            "--json",
        )
    )
    assert report["saved"] == kind
    assert report["validation_tokens"] > 0 and report["test_tokens"] > 0
    for name in ("base", "paper", "fixed", "buckets", "cosine-buckets", "learned"):
        row = report["policies"][name]
        assert row["validation_perplexity"] > 1 and row["test_perplexity"] > 1
    for png in report["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    evaluated = _json_ok(_run(knnlm, "eval", str(test), "--exact", "-q", "--json"))
    assert evaluated["policy_source"] == "tuned"
    assert evaluated["policy"]["kind"] == report["policies"][kind]["policy"]["kind"]
    assert evaluated["temperature"] == pytest.approx(report["policies"][kind]["temperature"])
    assert evaluated["knn_perplexity"] == pytest.approx(
        report["policies"][kind]["test_perplexity"], rel=1e-4
    )
    assert evaluated["base_perplexity"] == pytest.approx(
        report["policies"]["base"]["test_perplexity"], rel=1e-4
    )
    # tune's validation numbers are eval's numbers too
    paper = _json_ok(
        _run(
            knnlm,
            "eval",
            str(validation),
            "--exact",
            "-q",
            "--json",
            "--lambda",
            "0.25",
            "--temperature",
            "1",
        )
    )
    assert paper["policy_source"] == "flags"
    assert paper["knn_perplexity"] == pytest.approx(
        report["policies"]["paper"]["validation_perplexity"], rel=1e-4
    )


def test_flags_override_the_tuned_policy(knnlm: Knnlm, splits: tuple[Path, Path]) -> None:
    validation, test = splits
    _json_ok(_run(knnlm, "tune", str(validation), "--exact", "--buckets", "4", "-q", "--json"))
    info = knnlm.info_json()
    assert info["policy"]["kind"] == "buckets" and info["policy"]["k"] == 8
    fixed = _json_ok(_run(knnlm, "eval", str(test), "-q", "--json", "--lambda", "0.3"))
    assert fixed["policy"] == {"kind": "fixed", "lambda": 0.3}
    assert fixed["temperature"] == 1.0 and fixed["policy_source"] == "flags"
    hotter = _json_ok(_run(knnlm, "eval", str(test), "-q", "--json", "--temperature", "7"))
    assert hotter["policy"]["kind"] == "buckets" and hotter["temperature"] == 7.0
    text = knnlm.info()
    assert "buckets, T=" in text.stdout


def test_tune_refuses_to_report_on_its_own_validation_text(
    knnlm: Knnlm, splits: tuple[Path, Path]
) -> None:
    validation, _ = splits
    result = _run(knnlm, "tune", str(validation), "--test", str(validation / "0.txt"), "-q")
    _one_line_error(result, "both in the validation", "--test")
    assert knnlm.info_json()["policy"] is None  # nothing saved


def test_tune_without_a_collection_is_one_line(knnlm: Knnlm, splits: tuple[Path, Path]) -> None:
    result = knnlm("tune", str(splits[0]), *knnlm.model_args(), *knnlm.store_args("nope"), "-q")
    _one_line_error(result, "knnlm ingest")


def test_generate_streams_and_repeats_with_a_seed(knnlm: Knnlm) -> None:
    prompt = "def add(a, b):\n"
    greedy = [
        _json_ok(
            _run(
                knnlm,
                "generate",
                "-p",
                prompt,
                "--max-new-tokens",
                "6",
                "--sample-temperature",
                "0",
                "--json",
            )
        )
        for _ in range(2)
    ]
    assert greedy[0]["completion"] == greedy[1]["completion"]
    assert greedy[0]["new_tokens"] == 6 and greedy[0]["knn"] is True
    sampled = [
        _json_ok(
            _run(
                knnlm,
                "generate",
                "-p",
                prompt,
                "--max-new-tokens",
                "6",
                "--seed",
                "3",
                "--sample-top-p",
                "0.9",
                "--sample-top-k",
                "20",
                "--json",
            )
        )
        for _ in range(2)
    ]
    assert sampled[0]["completion"] == sampled[1]["completion"]
    base = _json_ok(
        _run(
            knnlm,
            "generate",
            "-p",
            prompt,
            "--max-new-tokens",
            "6",
            "--sample-temperature",
            "0",
            "--no-knn",
            "--json",
        )
    )
    assert base["knn"] is False
    streamed = _run(
        knnlm, "generate", "-p", prompt, "--max-new-tokens", "6", "--sample-temperature", "0"
    )
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.startswith(prompt + greedy[0]["completion"])
    assert "6 tokens in" in streamed.stderr


def test_generate_refuses_to_run_past_the_context(knnlm: Knnlm) -> None:
    result = _run(knnlm, "generate", "-p", "x", "--max-new-tokens", "500")
    _one_line_error(result, "context")


def test_explain_shows_the_source_text_of_neighbours(knnlm: Knnlm, corpus_dir: Path) -> None:
    text = CORPUS_LINES[2] * 3  # exactly a stored document: its keys are in the store
    result = _run(knnlm, "explain", "-t", text, "--neighbours", "2", "--exact", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(knnlm_tokens(knnlm, text))
    exact_hits = 0
    for row in rows:
        assert 0 <= row["lmbda"] <= 1 and 0 < row["prob"] <= 1
        assert len(row["lm_top"]) == 3 and len(row["neighbours"]) == 2
        nearest = row["neighbours"][0]
        assert nearest["domain"] == "default"
        source = Path(nearest["source"])
        assert source.parent in (corpus_dir, corpus_dir / "sub")
        # what the payload says precedes the value is really in that file, value included
        assert nearest["context"] + nearest["token"] in source.read_text()
        if nearest["sq_distance"] < 1e-6 and row["position"] > 3:
            # memorized (past the first tokens, which every document shares): the
            # neighbour knows the answer
            exact_hits += 1
            assert nearest["token"] == row["token"]
    assert exact_hits >= len(rows) // 2
    human = _run(knnlm, "explain", "-t", "def add(a, b):", "--neighbours", "1")
    assert human.exit_code == 0, human.output
    assert "LM :" in human.stdout and "kNN:" in human.stdout and "doc" in human.stdout


def test_explain_refuses_empty_text(knnlm: Knnlm) -> None:
    _one_line_error(_run(knnlm, "explain", "-t", "  "), "--text is empty")


def knnlm_tokens(knnlm: Knnlm, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(knnlm.model))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_gate_is_saved_and_eval_reproduces_its_numbers(
    knnlm: Knnlm, splits: tuple[Path, Path]
) -> None:
    """A generous budget makes the gate skip searches; eval then skips the same share of the
    test tokens and gives tune's gated test perplexity; --no-gate gives the ungated one."""
    validation, test = splits
    report = _json_ok(
        _run(
            knnlm,
            "tune",
            str(validation),
            "--test",
            str(test),
            "--exact",
            "--buckets",
            "4",
            "--gate-max-cost",
            "50",
            "-q",
            "--json",
        )
    )
    gate = report["gate"]
    assert gate["threshold"] is not None
    assert 0 < gate["validation"]["skipped_share"] <= 1
    assert gate["validation"]["change_percent"] <= 50 + 1e-6  # within the budget
    gated = _json_ok(_run(knnlm, "eval", str(test), "--exact", "-q", "--json"))
    assert gated["gate"]["threshold"] == pytest.approx(gate["threshold"])
    assert gated["skipped_share"] == pytest.approx(gate["test"]["skipped_share"])
    assert gated["searches"] == round(gated["tokens"] * (1 - gate["test"]["skipped_share"]))
    assert gated["knn_perplexity"] == pytest.approx(gate["test"]["perplexity"], rel=1e-4)
    ungated = _json_ok(_run(knnlm, "eval", str(test), "--exact", "--no-gate", "-q", "--json"))
    assert ungated["skipped_share"] == 0 and ungated["gate"] is None
    assert ungated["knn_perplexity"] == pytest.approx(
        report["policies"]["buckets"]["test_perplexity"], rel=1e-4
    )
    assert knnlm.info_json()["policy"]["gate_threshold"] == pytest.approx(gate["threshold"])
    # an explicit lambda is a fixed policy, which the gate was not fitted for
    fixed = _json_ok(_run(knnlm, "eval", str(test), "--lambda", "0.3", "-q", "--json"))
    assert fixed["gate"] is None and fixed["skipped_share"] == 0


def test_a_zero_gate_budget_saves_no_gate(knnlm: Knnlm, splits: tuple[Path, Path]) -> None:
    validation, test = splits
    report = _json_ok(
        _run(
            knnlm, "tune", str(validation), "--buckets", "4", "--gate-max-cost", "0", "-q", "--json"
        )
    )
    assert "gate" not in report
    evaluated = _json_ok(_run(knnlm, "eval", str(test), "-q", "--json"))
    assert evaluated["gate"] is None and evaluated["searches"] == evaluated["tokens"]
