"""The ``knnlm`` command end to end with the tiny models: output, exit codes and error lines.

Every expected failure must be one ``knnlm: error: ...`` line on stderr with exit code 1, no
traceback, and no change to the store.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from knn_store.errors import (
    CollectionMissing,
    CorpusError,
    DimensionMismatch,
    KnnlmError,
    StoreUnavailable,
)
from knnlm.cli import cli
from tests.files import write as _write

UNREACHABLE = ["--backend", "qdrant", "--url", "http://127.0.0.1:9", "--timeout", "2"]
SECRET = "s3cr3t-api-key-7f2c9d"


class Knnlm:
    """Runs ``knnlm`` in-process against one temp data dir, with the tiny-model settings."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp = tmp
        self.model = model
        self.data_dir = tmp / "data"
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        # There is no --model-cache flag; its variable is the way to set it.
        full_env = {"KNNLM_MODEL_CACHE": str(self.tmp / "cache"), **(env or {})}
        return self.runner.invoke(cli, list(args), env=full_env)

    def store_args(self, collection: str = "test") -> list[str]:
        return ["--data-dir", str(self.data_dir), "--collection", collection]

    def model_args(self, model: Path | None = None) -> list[str]:
        return ["--model", str(model or self.model), "--window", "16", "--stride", "8"]

    def ingest(
        self,
        *args: str,
        model: Path | None = None,
        collection: str = "test",
        env: dict[str, str] | None = None,
    ) -> Result:
        return self("ingest", *self.model_args(model), *self.store_args(collection), *args, env=env)

    def eval(
        self,
        *args: str,
        model: Path | None = None,
        collection: str = "test",
        env: dict[str, str] | None = None,
    ) -> Result:
        return self("eval", *self.model_args(model), *self.store_args(collection), *args, env=env)

    def info(self, *args: str, collection: str = "test") -> Result:
        return self("info", *self.store_args(collection), *args)

    def info_json(self, collection: str = "test") -> dict[str, Any]:
        return _json_ok(self.info("--json", collection=collection))

    def collection_exists(self, collection: str = "test") -> bool:
        return (self.data_dir / collection).exists()


def _json_ok(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.exception is None
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def _one_line_error(result: Result, *fragments: str) -> str:
    """Assert the expected-failure contract; return the error line."""
    assert result.exit_code == 1, (result.output, result.exception)
    # CliRunner reports an escaped exception as exit code 1 too: it must be a clean exit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("knnlm: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def knnlm(tmp_path: Path, tiny_models: dict[str, Path]) -> Knnlm:
    return Knnlm(tmp_path, tiny_models["gpt2"])


@pytest.fixture
def populated(knnlm: Knnlm, corpus_dir: Path) -> dict[str, Any]:
    """Collection 'test' built from corpus_dir with gpt2; returns its `info --json`."""
    _json_ok(knnlm.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    info = knnlm.info_json()
    assert info["points"] > 0
    return info


# --- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["ingest", "eval", "tune", "generate", "explain", "info", "--debug"]),
        (
            ["ingest"],
            ["--glob", "--text-field", "--skip-invalid", "--key-type", "--domain", "--json"],
        ),
        (["eval"], ["--top-k", "--lambda", "--temperature", "--exact", "--search-domain"]),
        (["info"], ["--collection", "--data-dir", "--url", "--backend", "--json"]),
        (["tune"], ["--test", "--buckets", "--save", "--plots", "--exact", "--top-k"]),
        (
            ["generate"],
            ["--prompt", "--max-new-tokens", "--sample-temperature", "--sample-top-p", "--seed"],
        ),
        (["explain"], ["--text", "--neighbours", "--top", "--lambda", "--json"]),
    ],
)
def test_help_lists_the_flags(command: list[str], expected: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage:")
    for flag in expected:
        assert flag in result.stdout, flag


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (["ingest"], ["KNNLM_MODEL", "KNNLM_KEY_TYPE", "KNNLM_DOMAIN", "KNNLM_WINDOW"]),
        (["eval"], ["KNNLM_TOP_K", "KNNLM_LAMBDA", "KNNLM_TEMPERATURE", "KNNLM_HNSW_EF"]),
        (["info"], ["KNNLM_COLLECTION", "KNNLM_DATA_DIR", "KNNLM_URL", "KNNLM_API_KEY"]),
    ],
)
def test_help_names_the_environment_variables(command: list[str], variables: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "-h"])
    assert result.exit_code == 0, result.output
    for name in variables:
        assert name in result.stdout, name


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from knnlm.cli import cli\n"
        "for cmd in ([], ['ingest'], ['eval'], ['info'], ['tune'], ['generate'], ['explain']):\n"
        "    assert CliRunner().invoke(cli, [*cmd, '--help']).exit_code == 0\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "False"]


# --- the happy path ------------------------------------------------------------------------


def test_ingest_is_idempotent_then_info_and_eval(
    tmp_path: Path, tiny_model: Path, corpus_dir: Path
) -> None:
    knnlm = Knnlm(tmp_path, tiny_model)
    first = _json_ok(knnlm.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    assert first["collection"] == "test"
    assert first["domain"] == "default"
    assert first["documents"] == 7  # doc0..doc5 and sub/nested.txt
    assert first["skipped_files"] == 1  # empty.txt
    assert first["resumed_documents"] == 0
    assert first["points_added"] > 0
    assert first["points_added"] == first["tokens"] == first["points_total"]

    again = _json_ok(knnlm.ingest(str(corpus_dir), "--glob", "**/*.txt", "-q", "--json"))
    assert again["points_added"] == 0
    assert again["tokens"] == 0
    assert again["resumed_documents"] == 7
    assert again["points_total"] == first["points_total"]

    info = knnlm.info_json()
    assert info["points"] == first["points_total"]
    assert info["domains"] == {"default": first["points_total"]}
    assert info["collection"] == "test"
    assert info["backend"] == "edge"
    assert info["location"] == str(knnlm.data_dir / "test")
    assert info["model"] == tiny_model.name
    assert info["key_type"] == "ffn_input"
    assert info["dim"] == 32

    held_out = corpus_dir / "doc0.txt"
    out = _json_ok(knnlm.eval(str(held_out), "--exact", "-q", "--json", "--top-k", "4"))
    assert out["k"] == 4
    assert out["exact"] is True
    assert (out["window"], out["stride"], out["collection"]) == (16, 8, "test")
    assert out["tokens"] > 0
    for key in ("base_perplexity", "knn_perplexity"):
        assert math.isfinite(out[key])
        assert out[key] > 1
    # The text is in the datastore, so exact retrieval finds its next tokens at distance 0.
    assert out["knn_perplexity"] < out["base_perplexity"]
    assert out["change_percent"] < 0


def test_domains_add_up(knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path) -> None:
    extra = _write(tmp_path / "extra.txt", "while True:\n    break\n")
    out = _json_ok(knnlm.ingest(str(extra), "--domain", "loops", "-q", "--json"))
    assert out["domain"] == "loops"
    assert out["points_added"] > 0
    info = knnlm.info_json()
    assert info["domains"] == {"default": populated["points"], "loops": out["points_added"]}
    assert info["points"] == populated["points"] + out["points_added"]


def test_human_readable_output(knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path) -> None:
    ingest = knnlm.ingest(str(corpus_dir / "doc1.txt"), "-q")
    assert ingest.exit_code == 0, ingest.output
    assert ingest.stdout.startswith("ingested 1 documents (1 already stored")
    assert f"{populated['points']:,} in total" in ingest.stdout

    info = knnlm.info()
    assert info.exit_code == 0, info.output
    assert "points" in info.stdout
    assert f"default ({populated['points']:,})" in info.stdout

    ev = knnlm.eval(str(corpus_dir / "doc1.txt"), "-q", "--top-k", "4", "--exact")
    assert ev.exit_code == 0, ev.output
    assert "base LM" in ev.stdout
    assert "kNN-LM" in ev.stdout
    assert "k=4 " in ev.stdout
    assert "exact" in ev.stdout


def test_progress_goes_to_stderr_not_stdout(knnlm: Knnlm, corpus_dir: Path) -> None:
    result = knnlm.ingest(str(corpus_dir), "--json")  # no -q: progress bar on
    out = _json_ok(result)  # stdout is still exactly one JSON document
    assert out["points_added"] > 0
    assert "ingest" in result.stderr


def test_skip_invalid_and_text_field_reach_the_reader(knnlm: Knnlm, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _write(folder / "a.jsonl", '{"body": "first record here"}\n{"body": "second one"}\n')
    _write(folder / "b.bin", b"\x00\x01\x02\x03")
    wrong_field = knnlm.ingest(str(folder), "-q", "--json")
    _one_line_error(wrong_field, "a.jsonl:1", "'text'", "--text-field")
    binary = knnlm.ingest(str(folder), "--text-field", "body", "-q", "--json")
    _one_line_error(binary, "b.bin", "binary")
    both_skipped = knnlm.ingest(str(folder), "--skip-invalid", "-q", "--json")
    _one_line_error(both_skipped, "no documents")
    assert not knnlm.collection_exists()

    out = _json_ok(
        knnlm.ingest(str(folder), "--skip-invalid", "--text-field", "body", "-q", "--json")
    )
    assert out["documents"] == 2
    assert out["skipped_files"] == 1
    assert out["points_added"] > 0


# --- bad input: one line, exit 1, store unchanged ------------------------------------------


def _bad_input(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A bad corpus path of ``kind`` and a fragment its error line must hold."""
    bad = tmp_path / "bad"
    if kind == "missing":
        return bad / "missing.txt", "missing.txt"
    if kind == "empty":
        return _write(bad / "empty.txt", ""), "empty.txt"
    if kind == "binary":
        return _write(bad / "blob.txt", b"\x7fELF\x00\x00\x01binary"), "blob.txt"
    if kind == "non_utf8":
        return _write(bad / "latin1.txt", b"caf\xe9\n"), "latin1.txt"
    if kind == "blank_folder":
        _write(bad / "blank" / "a.txt", "")
        _write(bad / "blank" / "b.txt", "  \n\t\n")
        _write(bad / "blank" / "sub" / "c.txt", "\n")
        return bad / "blank", "no documents"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "empty", "binary", "non_utf8", "blank_folder"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_into_a_new_collection(knnlm: Knnlm, tmp_path: Path, kind: str) -> None:
    path, fragment = _bad_input(kind, tmp_path)
    _one_line_error(knnlm.ingest(str(path), "-q", "--json"), fragment)
    assert not knnlm.collection_exists()
    _one_line_error(knnlm.info("--json"), "no collection 'test'")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_into_an_existing_collection(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    path, fragment = _bad_input(kind, tmp_path)
    _one_line_error(knnlm.ingest(str(path), "-q", "--json"), fragment)
    assert knnlm.info_json() == populated


@pytest.mark.parametrize("kind", ["missing", "empty", "binary", "non_utf8"])
def test_eval_of_bad_input(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    path, fragment = _bad_input(kind, tmp_path)
    _one_line_error(knnlm.eval(str(path), "-q", "--json"), fragment)
    assert knnlm.info_json() == populated


def test_eval_of_a_folder_without_tokens(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path
) -> None:
    path, _ = _bad_input("blank_folder", tmp_path)
    _one_line_error(knnlm.eval(str(path), "-q", "--json"), "nothing to evaluate")


def test_other_key_type_is_refused(
    knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path
) -> None:
    args = (str(corpus_dir / "doc0.txt"), "--key-type", "final", "-q", "--json")
    line = _one_line_error(knnlm.ingest(*args), "ffn_input", "final", "'test'")
    assert line.index("ffn_input") < line.index("final")  # built with ..., you are using ...
    assert knnlm.info_json() == populated
    _one_line_error(knnlm.eval(*args), "ffn_input", "final")


def test_eval_takes_the_collections_key_type_when_none_is_given(
    tmp_path: Path, tiny_model: Path, corpus_dir: Path
) -> None:
    knnlm = Knnlm(tmp_path, tiny_model)
    _json_ok(knnlm.ingest(str(corpus_dir), "--key-type", "final", "-q", "--json"))
    assert knnlm.info_json()["key_type"] == "final"
    scores = _json_ok(knnlm.eval(str(corpus_dir / "doc0.txt"), "-q", "--json", "--exact"))
    assert scores["knn_perplexity"] < scores["base_perplexity"]


def test_other_model_is_refused(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_model: Path, corpus_dir: Path
) -> None:
    other = next(m for m in tiny_models.values() if m != tiny_model)
    knnlm = Knnlm(tmp_path, tiny_model)
    _json_ok(knnlm.ingest(str(corpus_dir), "-q", "--json"))
    before = knnlm.info_json()
    text = str(corpus_dir / "doc2.txt")
    built, using = f"'{tiny_model.name}'", f"'{other.name}'"
    line = _one_line_error(knnlm.ingest(text, "-q", "--json", model=other), built, using)
    assert line.index(built) < line.index(using)
    assert knnlm.info_json() == before
    _one_line_error(knnlm.eval(text, "-q", "--json", model=other), built, using)


def test_window_beyond_the_model_context(knnlm: Knnlm, corpus_dir: Path) -> None:
    args = (str(corpus_dir / "doc0.txt"), "--window", "200", "-q", "--json")
    _one_line_error(knnlm.ingest(*args), "--window (200)", "128")
    assert not knnlm.collection_exists()


def test_eval_window_beyond_the_model_context(
    knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path
) -> None:
    args = (str(corpus_dir / "doc0.txt"), "--window", "200", "-q", "--json")
    _one_line_error(knnlm.eval(*args), "--window (200)", "128")


@pytest.mark.parametrize("command", ["eval", "info"])
def test_missing_collection(
    knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path, command: str
) -> None:
    if command == "eval":
        result = knnlm.eval(str(corpus_dir / "doc0.txt"), "-q", collection="nope")
    else:
        result = knnlm.info(collection="nope")
    _one_line_error(result, "'nope'", "knnlm ingest")
    assert not knnlm.collection_exists("nope")
    assert knnlm.info_json() == populated


def test_missing_data_dir(knnlm: Knnlm) -> None:
    _one_line_error(knnlm.info("--json"), "no collection 'test'")
    assert not knnlm.data_dir.exists()


@pytest.mark.parametrize("command", ["ingest", "eval", "info"])
def test_unreachable_server(knnlm: Knnlm, corpus_dir: Path, command: str) -> None:
    text = str(corpus_dir / "doc0.txt")
    if command == "ingest":
        result = knnlm.ingest(text, "-q", *UNREACHABLE)
    elif command == "eval":
        result = knnlm.eval(text, "-q", *UNREACHABLE)
    else:
        result = knnlm.info(*UNREACHABLE)
    _one_line_error(result, "cannot reach Qdrant at http://127.0.0.1:9")
    assert not knnlm.data_dir.exists()  # nothing fell back to the embedded store


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--top-k", "0"], "--top-k"),
        (["--lambda", "1.5"], "--lambda"),
        (["--lambda", "-0.1"], "--lambda"),
        (["--temperature", "0"], "--temperature"),
        (["--stride", "20", "--window", "16"], "stride (20) must not exceed window (16)"),
        (["--window", "1"], "--window"),
        (["--collection", "a/b"], "plain name"),
        (["--backend", "qdrant"], "needs a url"),
    ],
)
def test_invalid_settings(knnlm: Knnlm, corpus_dir: Path, flags: list[str], fragment: str) -> None:
    result = knnlm.eval(str(corpus_dir / "doc0.txt"), "-q", *flags)
    _one_line_error(result, "invalid settings", fragment)


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("KNNLM_TOP_K", "0", "--top-k"),
        ("KNNLM_TOP_K", "many", "--top-k"),
        ("KNNLM_LAMBDA", "2", "--lambda"),
    ],
)
def test_invalid_settings_from_the_environment(
    knnlm: Knnlm, corpus_dir: Path, variable: str, value: str, fragment: str
) -> None:
    result = knnlm.eval(str(corpus_dir / "doc0.txt"), "-q", env={variable: value})
    _one_line_error(result, "invalid settings", fragment)


def test_invalid_settings_stop_ingest_before_writing(knnlm: Knnlm, corpus_dir: Path) -> None:
    _one_line_error(knnlm.ingest(str(corpus_dir), "-q", "--upsert-batch", "0"), "--upsert-batch")
    assert not knnlm.collection_exists()


@pytest.mark.parametrize(
    ("flags", "name"),
    [(["--key-type", "penultimate"], "--key-type"), (["--backend", "cloud"], "--backend")],
)
def test_unknown_choice_is_a_usage_error(
    knnlm: Knnlm, corpus_dir: Path, flags: list[str], name: str
) -> None:
    result = knnlm.ingest(str(corpus_dir), "-q", *flags)
    assert result.exit_code == 2
    assert "Usage:" in result.stderr
    assert name in result.stderr
    assert "knnlm: error:" not in result.output
    assert not knnlm.collection_exists()


def test_environment_sets_top_k_and_a_flag_overrides_it(
    knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path
) -> None:
    text = str(corpus_dir / "doc3.txt")
    from_env = _json_ok(knnlm.eval(text, "-q", "--json", env={"KNNLM_TOP_K": "3"}))
    assert from_env["k"] == 3
    flag_wins = _json_ok(knnlm.eval(text, "-q", "--json", "--top-k", "5", env={"KNNLM_TOP_K": "3"}))
    assert flag_wins["k"] == 5
    default = _json_ok(knnlm.eval(text, "-q", "--json"))
    assert default["k"] == 1024


def test_environment_sets_lambda_and_exact(
    knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path
) -> None:
    text = str(corpus_dir / "doc3.txt")
    out = _json_ok(
        knnlm.eval(text, "-q", "--json", env={"KNNLM_LAMBDA": "0.5", "KNNLM_EXACT": "true"})
    )
    assert out["policy"] == {"kind": "fixed", "lambda": 0.5}
    assert out["exact"] is True
    env = {"KNNLM_LAMBDA": "0.5"}
    flag = _json_ok(knnlm.eval(text, "-q", "--json", "--lambda", "0.1", env=env))
    assert flag["policy"] == {"kind": "fixed", "lambda": 0.1}
    assert flag["exact"] is False


def test_store_location_from_the_environment(knnlm: Knnlm, populated: dict[str, Any]) -> None:
    env = {"KNNLM_DATA_DIR": str(knnlm.data_dir), "KNNLM_COLLECTION": "test"}
    assert _json_ok(knnlm("info", "--json", env=env)) == populated
    overridden = knnlm("info", "--json", "--collection", "other", env=env)
    _one_line_error(overridden, "'other'")


# --- secrets and --debug -------------------------------------------------------------------


def _assert_secret_absent(result: Result) -> None:
    assert SECRET not in result.output
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    exc: BaseException | None = result.exception
    while exc is not None:
        assert SECRET not in str(exc)
        assert SECRET not in repr(exc)
        exc = exc.__cause__ or exc.__context__


@pytest.mark.parametrize("command", ["ingest", "eval", "info"])
def test_api_key_never_printed_on_unreachable_server(
    knnlm: Knnlm, corpus_dir: Path, command: str
) -> None:
    env = {"KNNLM_API_KEY": SECRET}
    text = str(corpus_dir / "doc0.txt")
    if command == "ingest":
        result = knnlm.ingest(text, "-q", *UNREACHABLE, env=env)
    elif command == "eval":
        result = knnlm.eval(text, "-q", *UNREACHABLE, env=env)
    else:
        result = knnlm("info", *knnlm.store_args(), *UNREACHABLE, env=env)
    _one_line_error(result, "cannot reach Qdrant")
    _assert_secret_absent(result)


def test_unreachable_server_in_a_real_process(tmp_path: Path) -> None:
    # Outside pytest, Python warnings reach stderr too: the error line must still be the only
    # 'knnlm: error:' line, the last line, with no traceback and no key anywhere.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KNNLM_")}
    env.update(KNNLM_API_KEY=SECRET, KNNLM_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "knnlm", "info", "--collection", "test", *UNREACHABLE],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stderr
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("knnlm: error:")] == lines[-1:]
    assert "cannot reach Qdrant at http://127.0.0.1:9" in lines[-1]


def test_api_key_not_in_debug_errors_or_other_output(
    knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path
) -> None:
    env = {"KNNLM_API_KEY": SECRET}
    debug = knnlm("--debug", "info", *knnlm.store_args(), *UNREACHABLE, env=env)
    assert isinstance(debug.exception, StoreUnavailable)
    _assert_secret_absent(debug)

    invalid = knnlm.eval(str(corpus_dir / "doc0.txt"), "-q", "--top-k", "0", env=env)
    _one_line_error(invalid, "invalid settings")
    _assert_secret_absent(invalid)

    for result in (knnlm.info(), knnlm.info("--json")):  # edge store: key unused, not shown
        assert result.exit_code == 0
        _assert_secret_absent(result)


def test_debug_flag_raises_the_error(knnlm: Knnlm, tmp_path: Path) -> None:
    result = knnlm("--debug", "info", *knnlm.store_args("nope"))
    assert isinstance(result.exception, CollectionMissing)
    assert isinstance(result.exception, KnnlmError)
    assert "knnlm: error:" not in result.output

    empty = _write(tmp_path / "empty.txt", "")
    result = knnlm("--debug", "ingest", *knnlm.model_args(), *knnlm.store_args(), str(empty))
    assert isinstance(result.exception, CorpusError)
    assert "empty.txt" in str(result.exception)
    assert "knnlm: error:" not in result.output


def test_debug_variable_raises_the_error(knnlm: Knnlm) -> None:
    result = knnlm("info", *knnlm.store_args("nope"), env={"KNNLM_DEBUG": "1"})
    assert isinstance(result.exception, CollectionMissing)
    assert "knnlm: error:" not in result.output


def test_debug_raises_mismatch(knnlm: Knnlm, populated: dict[str, Any], corpus_dir: Path) -> None:
    result = knnlm(
        "--debug",
        "ingest",
        *knnlm.model_args(),
        *knnlm.store_args(),
        "--key-type",
        "final",
        str(corpus_dir / "doc0.txt"),
        "-q",
    )
    assert isinstance(result.exception, DimensionMismatch)


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert version("knnlm") in result.stdout  # the installed package's, never a copy


def test_unprefixed_lambda_variable_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    from knn_store import KnnlmSettings

    monkeypatch.setenv("LMBDA", "0.9")
    monkeypatch.setenv("LAMBDA", "0.9")
    assert KnnlmSettings().lmbda is None  # the tuned policy, else 0.25
    monkeypatch.setenv("KNNLM_LAMBDA", "0.6")
    assert KnnlmSettings().lmbda == 0.6
    assert KnnlmSettings(lmbda=0.1).lmbda == 0.1
