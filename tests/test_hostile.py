"""Defects found by feeding knnlm hostile input: each test pins one, end to end where it can.

Tuning on text too small or already memorized, damaged policy records, sampling limits,
non-finite flags, environment variables, suggested flags, resume hints, skipped files and
read-only data folders.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from knn_store.errors import ConfigError, CorpusError, StoreDamaged
from knn_store.store.records import seal
from tests.files import write as _write
from tests.test_cli import Knnlm, _json_ok, _one_line_error

# --- helpers ---------------------------------------------------------------------------------


def _python_text(seed: int, functions: int) -> str:
    """Python-like text the datastore does not hold: new names and numbers, known shapes."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    out = []
    for i in range(functions):
        a, b = rng.sample(names, 2)
        op = rng.choice("+-*")
        out.append(f"def {a}_{i}({b}, n):\n    return {b} {op} n * {rng.randint(2, 99)}\n")
    return "".join(out)


@pytest.fixture
def knnlm(tmp_path: Path, tiny_models: dict[str, Path], corpus_dir: Path) -> Knnlm:
    runner = Knnlm(tmp_path, tiny_models["llama"])
    _json_ok(runner.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    return runner


def _tune(knnlm: Knnlm, *args: str, env: dict[str, str] | None = None) -> Any:
    return knnlm("tune", *knnlm.model_args(), *knnlm.store_args(), "--top-k", "8", *args, env=env)


def _no_policy_saved(knnlm: Knnlm) -> bool:
    return knnlm.info_json()["policy"] is None


# --- 1. tune refuses what it cannot fit, and policies that would hurt ------------------------


def test_tune_rules_are_the_documented_numbers() -> None:
    from knn_store.tuning import tokens_needed

    assert tokens_needed("fixed", buckets=64) == 64
    assert tokens_needed("buckets", buckets=64) == 64 * 32
    assert tokens_needed("cosine-buckets", buckets=10) == 320
    assert tokens_needed("learned", buckets=64) == 256
    assert tokens_needed("none", buckets=64) == 64
    # with one fold of 4 held out, the other 3 still hold what the fit needs (`tune --help`)
    held = {"fixed": 86, "buckets": 2731, "learned": 342, "learned-t": 683, "none": 64}
    for kind, n in held.items():
        assert tokens_needed(kind, buckets=64, held_out=True) == n


@pytest.mark.parametrize(
    ("text", "args", "fragments"),
    [
        ("def", [], ["1 token", "2,731", "32 per bucket, in 3 of 4 folds"]),  # BOS + 1
        ("def", ["--save", "fixed"], ["1 token", "at least 86"]),
        ("LONG", ["--buckets", "10000"], ["10,000 buckets", "426,667", "32 per bucket"]),
        ("SHORT", ["--save", "learned"], ["learned", "at least 342"]),
        ("SHORT", ["--save", "none"], ["at least 64"]),
    ],
    ids=["one-token", "one-token-fixed", "10000-buckets", "learned", "report-only"],
)
def test_tune_refuses_validation_text_too_small_for_the_policy(
    knnlm: Knnlm, tmp_path: Path, text: str, args: list[str], fragments: list[str]
) -> None:
    body = {"LONG": _python_text(1, 12), "SHORT": _python_text(2, 1)}.get(text, text)
    valid = _write(tmp_path / "valid.txt", body)
    _one_line_error(_tune(knnlm, str(valid), "--exact", "-q", *args), *fragments)
    assert _no_policy_saved(knnlm)


def test_tune_refuses_text_the_datastore_already_holds(knnlm: Knnlm, corpus_dir: Path) -> None:
    result = _tune(knnlm, str(corpus_dir), "--glob", "**/*.txt", "--save", "fixed", "-q")
    line = _one_line_error(result, "already holds", "50%")
    assert "100%" in line or "99%" in line or "98%" in line  # the share found, named
    assert _no_policy_saved(knnlm)


def test_force_saves_what_a_rule_refuses_and_the_record_says_so(
    knnlm: Knnlm, corpus_dir: Path
) -> None:
    from knn_store.store.records import unseal

    result = _tune(
        knnlm, str(corpus_dir), "--glob", "**/*.txt", "--save", "fixed", "--force", "-q", "--json"
    )
    report = _json_ok(result)
    assert report["saved"] == "fixed"
    assert any("already holds" in reason for reason in report["forced"])
    policy_file = knnlm.data_dir / "test" / "policy.json"
    policy = unseal(json.loads(policy_file.read_text()), what="policy")
    assert policy["report"]["forced"] == report["forced"]


def test_tune_saves_a_policy_fitted_on_enough_held_out_text(knnlm: Knnlm, tmp_path: Path) -> None:
    valid = _write(tmp_path / "valid.txt", _python_text(3, 12))
    report = _json_ok(_tune(knnlm, str(valid), "--exact", "--save", "fixed", "-q", "--json"))
    assert report["saved"] == "fixed" and report["validation_tokens"] >= 64
    assert knnlm.info_json()["policy"]["kind"] == "fixed"


class _Blind:
    """lambda 0.99 exactly where the nearest neighbour of a validation token votes wrong:
    a policy that can only lose to the LM alone."""

    needs_cosine = False

    def __init__(self, wrong: torch.Tensor) -> None:
        self.wrong = wrong

    def __call__(self, features: Any) -> torch.Tensor:
        if len(features.sq_distances) != len(self.wrong):
            return torch.full((len(features.sq_distances),), 0.99)
        return torch.where(self.wrong, 0.99, 0.0)

    def temperatures(self, features: Any, base: float) -> float:
        return base  # one global T, as every policy but learned-t

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "lambda": 0.99}


def _harmful_learned(data: Any, temperature: float, **_: Any) -> Any:
    from knn_store.tuning import Tuned

    wrong = data.features.token_ids[:, 0].long() != data.targets
    assert wrong.any()
    policy, t = _Blind(wrong), 1e-3
    return Tuned("learned", policy, t, data.nll(policy, t))


def test_tune_refuses_to_save_a_policy_worse_than_the_base_lm(
    knnlm: Knnlm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("knn_store.tuning.fit_all.fit_learned", _harmful_learned)  # what tune calls
    valid = _write(tmp_path / "valid.txt", _python_text(4, 16))
    result = _tune(knnlm, str(valid), "--exact", "--save", "learned", "--gate-max-cost", "0", "-q")
    _one_line_error(result, "worse than the base LM", "validation")
    assert _no_policy_saved(knnlm)


def _noisy_split(n: int, seed: int, *, wins: float) -> Any:
    """n tokens where the neighbours (the nearest at distance 0) vote right for the first
    ``wins`` share and wrong for the rest, the LM giving the target 0.1 everywhere."""
    from knn_store.lambdas import QueryFeatures
    from knn_store.tuning import TuningData

    g = torch.Generator().manual_seed(seed)
    k = 4
    sq = torch.cat([torch.zeros(n, 1), torch.full((n, k - 1), 50.0)], dim=1)
    targets = torch.randint(0, 10, (n,), generator=g)
    right = torch.arange(n) < round(wins * n)
    ids = torch.where(right[:, None], targets[:, None], (targets[:, None] + 1) % 10).repeat(1, k)
    features = QueryFeatures(
        sq, ids.to(torch.int32), torch.full((n,), 2.0), torch.full((n,), -1.0), torch.zeros(n)
    )
    return TuningData(features, targets, torch.full((n,), math.log(0.1)))


def test_a_policy_whose_validation_gain_is_noise_is_refused_when_the_test_moves() -> None:
    """On validation the kNN is right just often enough that lambda 0.5 gains, within noise;
    on test it is always wrong, and the same policy costs a lot."""
    from knn_store.lambdas import FixedLambda
    from knn_store.tuning import Tuned, check_saveable, gain

    validation = _noisy_split(400, 0, wins=0.3)
    test = _noisy_split(400, 1, wins=0.0)
    policy = FixedLambda(0.5)
    tuned = Tuned("fixed", policy, 1.0, validation.nll(policy, 1.0))
    mean, error = gain(validation, tuned)
    assert mean > 0 and mean < 2 * error  # a gain, within noise
    check_saveable(validation, tuned)  # without test text there is nothing to tell
    with pytest.raises(ConfigError, match="within noise") as caught:
        check_saveable(validation, tuned, test=test)
    assert "\n" not in str(caught.value) and "test" in str(caught.value)
    # a clear validation gain is saved even where the test moves as much
    clear = _noisy_split(400, 2, wins=0.6)
    sure = Tuned("fixed", policy, 1.0, clear.nll(policy, 1.0))
    check_saveable(clear, sure, test=test)


def test_a_policy_worse_than_the_lm_on_validation_is_refused_by_the_library() -> None:
    from knn_store.lambdas import FixedLambda
    from knn_store.tuning import Tuned, check_saveable

    wrong = _noisy_split(300, 3, wins=0.0)
    policy = FixedLambda(0.3)
    with pytest.raises(ConfigError, match="worse than the base LM"):
        check_saveable(wrong, Tuned("fixed", policy, 1.0, wrong.nll(policy, 1.0)))


def test_held_share_counts_tokens_whose_nearest_key_is_their_own() -> None:
    from knn_store.tuning import check_not_held, held_share

    data = _noisy_split(100, 4, wins=0.5)
    assert data.features.cosine is not None
    data.features.cosine[:10] = 1.0
    assert held_share(data) == pytest.approx(0.1)
    check_not_held(data)
    data.features.cosine[:60] = 1.0
    with pytest.raises(CorpusError, match="60%"):
        check_not_held(data)


def test_text_the_datastore_nearly_repeats_is_refused() -> None:
    """A licence header that stored files repeat with small changes: 23% of its tokens
    found a near copy (cosine >= 0.99) where held-out files find 2-3%. `tune --save fixed`
    on it saved lambda 0.66 over a good policy, with no warning."""
    from knn_store.tuning import check_not_held, near_share

    data = _noisy_split(100, 4, wins=0.5)
    assert data.features.cosine is not None
    data.features.cosine[:3] = 0.995  # as much as held-out text finds
    data.features.cosine[3:15] = 0.9
    check_not_held(data)
    data.features.cosine[:23] = 0.995
    assert near_share(data) == pytest.approx(0.23)
    with pytest.raises(CorpusError, match=r"too close to the datastore: 23%.*--force"):
        check_not_held(data)


def _stretch(n: int, *, spread: bool) -> Any:
    """n tokens of which a quarter find neighbours that vote right: in one stretch (the
    first fold), or spread over the text; the rest find neighbours that vote wrong."""
    data = _noisy_split(n, 5, wins=0.25)
    if not spread:
        return data
    order = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    return data.take(order)


def test_a_policy_that_only_helps_on_one_stretch_of_the_validation_text_is_refused() -> None:
    """Fitted on all of it, lambda 0.17 gains on validation (its one good stretch pays for
    the rest); fitted without each fold in turn, it loses on the folds it did not see, as
    it would on other text."""
    from knn_store.errors import ConfigError
    from knn_store.tuning import check_held_out, gain, tune

    stretch = _stretch(400, spread=False)
    fitted = tune(stretch, buckets=4).policies["fixed"]
    assert gain(stretch, fitted)[0] > 0.05  # what tune used to go by
    with pytest.raises(ConfigError, match=r"fold it was not fitted on \(perplexity \+"):
        check_held_out(stretch, "fixed", buckets=4)
    # the same evidence spread over the text: every fold is like the others
    spread = _stretch(400, spread=True)
    assert check_held_out(spread, "fixed", buckets=4) < -0.05
    assert check_held_out(spread, "buckets", buckets=4) < -0.05


def test_held_out_folds_are_stretches_of_text_and_cover_every_position() -> None:
    from knn_store.tune_collection import split_held_out
    from knn_store.tuning import fold_rows

    folds = fold_rows(10, 4)
    assert [f.tolist() for f in folds] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    sequences = [np.arange(7), np.arange(3), np.arange(9)]  # 6 + 2 + 8 = 16 scored
    fit, held = split_held_out(sequences, 4)
    assert sum(len(s) - 1 for s in fit) == 12 and sum(len(s) - 1 for s in held) == 4
    assert np.concatenate(held).tolist() == [4, 5, 6, 7, 8]  # the last 4 positions of the last


# --- 2. damaged policy records are refused on load -------------------------------------------


def _good_record() -> dict[str, Any]:
    from knn_store.gate import RetrievalGate
    from knn_store.lambdas import BucketLambda, LearnedLambda

    return {
        "fixed": {"kind": "fixed", "lambda": 0.3},
        "buckets": BucketLambda("d_min", [1.0, 2.0], [0.5, 0.3, 0.1]).to_dict(),
        "learned": LearnedLambda(
            ["d_min", "cosine"], [0.0, 0.5], [1.0, 0.2], [([[0.5, -0.5]], [0.1])]
        ).to_dict(),
        "gate": RetrievalGate([1.0, -1.0], [0.5, 0.5], [1.0, -2.0], 0.1, threshold=0.4).to_dict(),
    }


def _record(policy: str = "buckets", **changes: Any) -> dict[str, Any]:
    parts = _good_record()
    record: dict[str, Any] = {
        "policy": parts[policy],
        "temperature": 2.0,
        "k": 8,
        "model_fingerprint": "f",
        "key_type": "ffn_input",
        "gate": parts["gate"],
        "domains": [],
        "report": {},
    }
    record.update(changes)
    return record


def _edit(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``record`` with the value at a dotted path (list indexes as numbers) replaced."""
    record = json.loads(json.dumps(record))
    *parents, last = path.split(".")
    node: Any = record
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return record


NAN, INF = float("nan"), float("inf")
DAMAGE = [
    ("buckets", "gate.weights.0", NAN),
    ("buckets", "gate.bias", INF),
    ("buckets", "gate.mean.1", -INF),
    ("buckets", "gate.std.0", NAN),
    ("buckets", "gate.threshold", NAN),
    ("buckets", "gate.threshold", 1.5),
    ("buckets", "temperature", INF),
    ("buckets", "temperature", 0.0),
    ("buckets", "temperature", -1.0),
    ("buckets", "temperature", "2"),
    ("buckets", "k", 0),
    ("buckets", "k", 2.5),
    ("buckets", "k", True),
    ("buckets", "policy.edges.0", NAN),
    ("buckets", "policy.edges.1", INF),
    ("buckets", "policy.edges", [2.0, 1.0]),
    ("buckets", "policy.lambdas.1", 1.5),
    ("buckets", "policy.lambdas.1", -0.1),
    ("buckets", "policy.lambdas.0", NAN),
    ("fixed", "policy.lambda", NAN),
    ("fixed", "policy.lambda", 2.0),
    ("fixed", "policy.lambda", True),
    ("learned", "policy.mean.0", NAN),
    ("learned", "policy.std.1", 0.0),
    ("learned", "policy.std.1", INF),
    ("learned", "policy.layers.0.0.0.1", NAN),
    ("learned", "policy.layers.0.1.0", -INF),
    ("buckets", "domains", ["a", 3]),
]


@pytest.mark.parametrize(("policy", "path", "value"), DAMAGE, ids=lambda x: repr(x)[:24])
def test_every_number_of_a_saved_policy_is_checked(policy: str, path: str, value: Any) -> None:
    from knn_store.saved_policy import SavedPolicy

    SavedPolicy.from_dict(_record(policy), collection="c")  # the undamaged record loads
    with pytest.raises(StoreDamaged) as caught:
        SavedPolicy.from_dict(_edit(_record(policy), path, value), collection="c")
    message = str(caught.value)
    assert "\n" not in message and "'c'" in message
    assert "knnlm tune" in message or "knnlm check" in message


def test_a_policy_with_nan_gate_weights_is_damage_for_check_and_eval(
    knnlm: Knnlm, tmp_path: Path
) -> None:
    """NaN gate weights used to make the gate skip every search without a word."""
    meta = json.loads((knnlm.data_dir / "test" / "meta.json").read_text())
    record = _record(
        "fixed", model_fingerprint=meta["model_fingerprint"], key_type=meta["key_type"]
    )
    record = _edit(record, "gate.weights.0", NAN)
    (knnlm.data_dir / "test" / "policy.json").write_text(json.dumps(seal(record)))
    checked = knnlm("check", *knnlm.store_args(), "-q")
    assert checked.exit_code == 1, checked.output
    assert any(
        line.startswith("policy") and "FAIL" in line for line in checked.stdout.splitlines()
    ), checked.stdout
    valid = _write(tmp_path / "held.txt", _python_text(5, 2))
    _one_line_error(knnlm.eval(str(valid), "-q"), "policy", "knnlm tune")


# --- 3. sampling is safe for every finite temperature and top_p ------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-7])
@pytest.mark.parametrize("top_p", [1.0, 1e-50, 5e-324])
def test_a_tiny_temperature_or_top_p_samples_the_likeliest_token(
    temperature: float, top_p: float
) -> None:
    from knn_store.generation import Sampling, sample_next

    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(300, generator=g) * 3, dim=-1)
    log_probs[5] = -math.inf  # a token the kNN-LM rules out
    best = int(log_probs.argmax())
    for seed in range(5):
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=seed * 10)
        gen = torch.Generator().manual_seed(seed)
        assert sample_next(log_probs, sampling, gen) == best


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e6, 1e300])
def test_any_finite_temperature_samples_a_possible_token(temperature: float) -> None:
    from knn_store.generation import Sampling, sample_next

    log_probs = torch.full((50,), -math.inf)
    log_probs[[3, 7, 11]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    gen = torch.Generator().manual_seed(1)
    seen = {sample_next(log_probs, Sampling(temperature=temperature), gen) for _ in range(40)}
    assert seen <= {3, 7, 11}


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_past_64_bits_is_refused_by_name(seed: int) -> None:
    from knn_store.generation import Sampling

    with pytest.raises(ConfigError, match="seed"):
        Sampling(seed=seed)
    Sampling(seed=2**64 - 1)  # the largest the generator takes
    Sampling(seed=-(2**63))


def test_generate_with_extreme_sampling_limits(knnlm: Knnlm) -> None:
    def generate(*args: str) -> Any:
        return knnlm(
            "generate",
            "--model",
            str(knnlm.model),
            *knnlm.store_args(),
            "--top-k",
            "8",
            "-p",
            "def add(a, b):\n",
            "--max-new-tokens",
            "5",
            "--json",
            *args,
        )

    greedy = _json_ok(generate("--sample-temperature", "0"))
    for args in (
        ["--sample-temperature", "1e-40", "--seed", "3"],
        ["--sample-top-p", "1e-50", "--seed", "4"],
        ["--sample-temperature", "1e-320", "--sample-top-p", "1e-320"],
    ):
        assert _json_ok(generate(*args))["completion"] == greedy["completion"], args
    _json_ok(generate("--seed", str(2**64 - 1)))
    refused = generate("--seed", str(2**64))
    assert refused.exit_code == 2 and "--seed" in refused.stderr, refused.output
    assert "Traceback" not in refused.output
    # vLLM's sampling parameters, with the service's meaning
    vllm = ["--sample-min-p", "1", "--repetition-penalty", "1", "--min-new-tokens", "5"]
    assert _json_ok(generate(*vllm, "--ignore-eos"))["completion"] == greedy["completion"]
    penalized = _json_ok(generate("--sample-temperature", "0", "--repetition-penalty", "50"))
    assert penalized["new_tokens"] == 5
    too_many = generate("--min-new-tokens", "6")
    assert too_many.exit_code == 1 and "Traceback" not in too_many.output
    _one_line_error(too_many, "--min-new-tokens")
    for flag, value in [("--repetition-penalty", "0"), ("--sample-min-p", "1.5")]:
        refused = generate(flag, value)
        assert refused.exit_code == 2 and flag in refused.stderr, refused.output


# --- 4. non-finite numbers in tune's own flags -----------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_tune_refuses_a_non_finite_gate_budget(knnlm: Knnlm, tmp_path: Path, value: str) -> None:
    valid = _write(tmp_path / "valid.txt", _python_text(6, 12))
    result = _tune(knnlm, str(valid), "--gate-max-cost", value, "-q")
    assert result.exit_code in (1, 2), result.output
    assert "--gate-max-cost" in result.stderr and "Traceback" not in result.output
    if result.exit_code == 1:
        _one_line_error(result, "--gate-max-cost")
    assert _no_policy_saved(knnlm)


def test_fit_gate_refuses_a_non_finite_budget() -> None:
    from knn_store.tuning import fit_fixed, fit_gate

    data = _noisy_split(100, 5, wins=0.5)
    with pytest.raises(ValueError, match="max_cost"):
        fit_gate(data, fit_fixed(data, 1.0), max_cost=math.nan)


# --- 5. KNNLM_SEARCH_DOMAIN ------------------------------------------------------------------


def test_the_search_domain_variable_restricts_retrieval(knnlm: Knnlm, tmp_path: Path) -> None:
    other = _write(tmp_path / "other" / "o.txt", _python_text(7, 3))
    _json_ok(knnlm.ingest(str(other), "--domain", "other", "-q", "--json"))
    held = str(_write(tmp_path / "held.txt", _python_text(8, 2)))

    def domains(env: dict[str, str], *args: str) -> list[str]:
        return _json_ok(knnlm.eval(held, "-q", "--json", *args, env=env))["domains"]

    assert domains({}) == []
    assert domains({"KNNLM_SEARCH_DOMAIN": "other"}) == ["other"]
    assert set(domains({"KNNLM_SEARCH_DOMAIN": "other, default"})) == {"other", "default"}
    assert domains({"KNNLM_SEARCH_DOMAIN": "other"}, "--search-domain", "default") == ["default"]
    _one_line_error(knnlm.eval(held, "-q", env={"KNNLM_SEARCH_DOMAIN": "nope"}), "no domain 'nope'")
    for command in ("eval", "tune", "generate", "explain", "serve"):
        helped = knnlm(command, "--help")
        assert "KNNLM_SEARCH_DOMAIN" in " ".join(helped.stdout.split()), command


# --- 6. suggested flags parse; flags are named as typed --------------------------------------


@pytest.mark.parametrize(
    ("created", "asked"),
    [
        (["--vectors-on-disk"], ["--no-vectors-on-disk"]),
        (["--no-index-on-disk"], ["--index-on-disk"]),
        ([], ["--indexing-threshold-kb", "64"]),
    ],
)
def test_a_storage_mismatch_suggests_a_command_that_runs(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    corpus_dir: Path,
    created: list[str],
    asked: list[str],
) -> None:
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    _json_ok(knnlm.ingest(str(corpus_dir), "-q", "--json", *created))
    line = _one_line_error(knnlm.ingest(str(corpus_dir), "-q", *asked), "rebuild")
    assert " True" not in line and " False" not in line and " None" not in line
    suggested = line.split("`")[1]
    argv = shlex.split(suggested.replace("NEW", "copy"))
    assert argv[:2] == ["knnlm", "rebuild"]
    rebuilt = knnlm(*argv[1:], *knnlm.store_args(), "-q")
    assert rebuilt.exit_code == 0, rebuilt.output
    # and the copy has what was asked: the same ingest now passes the check
    assert knnlm.ingest(str(corpus_dir), "-q", *asked, collection="copy").exit_code == 0


def test_a_bad_target_name_is_reported_under_the_flag_typed(knnlm: Knnlm, tmp_path: Path) -> None:
    line = _one_line_error(
        knnlm("rebuild", *knnlm.store_args(), "--to-collection", "../evil", "-q"),
        "--to-collection",
    )
    assert "--collection:" not in line
    line = _one_line_error(
        knnlm(
            "push",
            *knnlm.store_args(),
            "--to-local",
            str(tmp_path / "t"),
            "--to-collection",
            "bad name",
            "-q",
        ),
        "--to-collection",
    )
    assert "--collection:" not in line


# --- 7. "run it again to resume" only where a rerun can succeed ------------------------------


def test_a_refused_copy_does_not_promise_a_resume(knnlm: Knnlm, corpus_dir: Path) -> None:
    _json_ok(knnlm.ingest(str(corpus_dir), "-q", "--json", collection="other"))
    result = knnlm("rebuild", *knnlm.store_args(), "--to-collection", "other", "-q")
    line = _one_line_error(result, "already exists")
    assert "resume" not in line


def test_an_unreachable_target_still_says_resume(
    knnlm: Knnlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knn_store.errors import StoreUnavailable

    def unreachable(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("cannot reach Qdrant at http://x")

    monkeypatch.setattr("knn_store.store.transfer.copy_collection", unreachable)
    result = knnlm("rebuild", *knnlm.store_args(), "--to-collection", "copy", "-q")
    _one_line_error(result, "cannot reach", "run the same command again to resume")


@pytest.mark.parametrize(
    ("error", "resume"),
    [("StoreUnavailable", True), ("StoreAccessDenied", False), ("StoreDamaged", False)],
)
def test_ingest_promises_a_resume_only_after_a_transient_failure(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    corpus_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    resume: bool,
) -> None:
    import knn_store.errors as errors
    from knn_store.store.edge import EdgeStore

    def fails(*_: Any, **__: Any) -> None:
        raise getattr(errors, error)("the store said no")

    monkeypatch.setattr(EdgeStore, "upsert", fails)
    knnlm = Knnlm(tmp_path, tiny_models["gpt2"])
    line = _one_line_error(knnlm.ingest(str(corpus_dir), "-q"), "the store said no")
    assert ("run the same command again to resume" in line) is resume, line


# --- 8. --skip-invalid names what it skipped -------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_skip_invalid_names_the_skipped_files(knnlm: Knnlm, tmp_path: Path, command: str) -> None:
    folder = tmp_path / "mixed"
    _write(folder / "good.txt", _python_text(9, 12))
    _write(folder / "blob.bin", b"\x7fELF\x00\x01\x02")
    _write(folder / "latin1.txt", b"caf\xe9\n")
    args = ["--save", "none", "--exact"] if command == "tune" else []
    if command == "tune":
        result = _tune(knnlm, str(folder), "--skip-invalid", "-q", "--json", *args)
    else:
        result = knnlm.eval(str(folder), "--skip-invalid", "-q", "--json")
    assert result.exit_code == 0, result.output
    skipped = [x for x in result.stderr.splitlines() if x.startswith("knnlm: skipped")]
    assert len(skipped) == 2, result.stderr
    assert any("blob.bin" in x for x in skipped) and any("latin1.txt" in x for x in skipped)
    assert not any("good.txt" in x for x in skipped)


# --- 9. a read-only data folder --------------------------------------------------------------


def _as_a_user_without_write_access(args: list[str], env: dict[str, str]) -> Any:
    """Run ``knnlm`` in a child process that file permissions apply to: as is for a normal
    user; for root, with the capabilities that override them dropped."""
    command = [sys.executable, "-m", "knnlm", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, and no setpriv to drop the override of permissions")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    full_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KNNLM_")}
    return subprocess.run(
        command, env={**full_env, **env}, capture_output=True, text=True, timeout=300
    )


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_reading_a_read_only_data_folder_fails_with_one_honest_line(
    knnlm: Knnlm, tmp_path: Path
) -> None:
    copy = tmp_path / "read-only"
    shutil.copytree(knnlm.data_dir, copy)
    _read_only(copy)
    try:
        env = {"KNNLM_MODEL_CACHE": str(tmp_path / "cache")}
        for command in (["info"], ["check", "-q"], ["domains", "list"]):
            done = _as_a_user_without_write_access(
                [*command, "--data-dir", str(copy), "--collection", "test"], env
            )
            if done.returncode == 0:
                continue  # reading works: as good
            assert done.returncode == 1, (command, done.stderr)
            assert "Traceback" not in done.stderr and done.stdout == "", (command, done)
            lines = done.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("knnlm: error: "), (command, lines)
            assert "not writable" in lines[0] and "Permission denied" not in lines[0], lines
            assert "damaged" not in lines[0], lines  # nothing is wrong with the files
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
