"""What a hostile new user found, one test each: every one failed on the code before the
refactor (bc1ca3d) and must pass now.

1. an infinite or extreme temperature gave silently wrong perplexities;
2. a file where a folder belongs, or an absurd --top-k, gave tracebacks;
3. damaged stores passed `info`, or failed with a hint blaming another process;
4. `explain` on a long text printed nothing until the whole text was scored;
5. Ctrl-C exited 1 ("Aborted!") and said nothing about resuming;
6. smaller ones: raw Python warnings, cut-off gRPC errors, misleading messages.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.files import corrupt_wal, truncate_vector_files
from tests.files import write as _write
from tests.test_cli import Knnlm, _json_ok, _one_line_error

HELD_OUT = "while queue:\n    item = queue.pop()\n    yield item * 2\n"


@pytest.fixture
def knnlm(tmp_path: Path, tiny_models: dict[str, Path]) -> Knnlm:
    return Knnlm(tmp_path, tiny_models["gpt2"])


@pytest.fixture
def populated(knnlm: Knnlm, corpus_dir: Path) -> dict[str, Any]:
    _json_ok(knnlm.ingest(str(corpus_dir), "-q", "--json"))
    return knnlm.info_json()


def _env_without_knnlm(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KNNLM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# --- 1. extreme temperatures -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e309"])
def test_a_non_finite_temperature_is_refused_by_name(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path, value: str
) -> None:
    text = _write(tmp_path / "held.txt", HELD_OUT)
    result = knnlm.eval(str(text), "--temperature", value, "--lambda", "0.25", "-q")
    _one_line_error(result, "--temperature", "finite")


def test_extreme_temperatures_with_k_beyond_the_collection(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path
) -> None:
    """k larger than the collection pads with missing neighbours (d = +inf): with T = 1e300,
    -inf / inf made NaN and a wrong perplexity; now T = 1e300 behaves like T = 1e6 (near
    uniform over the neighbours found) and a tiny T like 1e-30 (the nearest only)."""
    text = _write(tmp_path / "held.txt", HELD_OUT)
    k = str(4 * populated["points"])

    def knn_ppl(temperature: str) -> float:
        flags = ["--temperature", temperature, "--lambda", "0.25", "--top-k", k]
        out = _json_ok(knnlm.eval(str(text), *flags, "-q", "--json"))
        assert math.isfinite(out["knn_perplexity"]), out
        assert out["zero_probability_tokens"] == 0
        return out["knn_perplexity"]

    assert knn_ppl("1e300") == pytest.approx(knn_ppl("1e6"), rel=1e-4)
    assert knn_ppl("1e-300") == pytest.approx(knn_ppl("1e-30"), rel=1e-6)

    from knn_store.knn import knn_log_probs

    sq = torch.tensor([[0.0, 3.0, math.inf, math.inf]])  # two found, two missing
    p = knn_log_probs(sq, torch.tensor([[1, 2, -1, -1]]), vocab_size=4, temperature=1e300).exp()
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0, 1].item() == pytest.approx(0.5) and p[0, 2].item() == pytest.approx(0.5)


# --- 2. one line instead of a traceback ------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "eval", "ingest", "check", "domains list"])
def test_data_dir_that_is_a_file(knnlm: Knnlm, tmp_path: Path, command: str) -> None:
    not_a_folder = _write(tmp_path / "data-file", "x")
    text = str(_write(tmp_path / "held.txt", HELD_OUT))
    store = ["--data-dir", str(not_a_folder), "--collection", "test"]
    args = {
        "info": ["info", *store],
        "eval": ["eval", text, *knnlm.model_args(), *store, "-q"],
        "ingest": ["ingest", text, *knnlm.model_args(), *store, "-q"],
        "check": ["check", *store, "-q"],
        "domains list": ["domains", "list", *store],
    }[command]
    _one_line_error(knnlm(*args), "--data-dir", "is a file")
    assert not_a_folder.read_text() == "x"


@pytest.mark.parametrize("command", ["info", "eval", "ingest"])
def test_a_file_where_the_collection_folder_belongs(
    knnlm: Knnlm, tmp_path: Path, command: str
) -> None:
    squatter = _write(knnlm.data_dir / "test", "not a collection")
    text = str(_write(tmp_path / "held.txt", HELD_OUT))
    if command == "info":
        result = knnlm.info()
    elif command == "eval":
        result = knnlm.eval(text, "-q")
    else:
        result = knnlm.ingest(text, "-q")
    _one_line_error(result, str(squatter), "is a file, not a collection folder")
    assert squatter.read_text() == "not a collection"


def test_check_of_a_file_where_the_collection_folder_belongs(knnlm: Knnlm) -> None:
    _write(knnlm.data_dir / "test", "not a collection")
    result = knnlm("check", *knnlm.store_args(), "-q")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stdout.startswith("open")
    assert "is a file, not a collection folder" in result.stdout


@pytest.mark.parametrize("command", ["eval", "explain", "tune", "generate"])
def test_an_absurd_top_k_is_capped_by_name(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path, command: str
) -> None:
    text = str(_write(tmp_path / "held.txt", HELD_OUT))
    args = {
        "eval": ["eval", text, "-q"],
        "explain": ["explain", "-t", HELD_OUT],
        "tune": ["tune", text, "-q"],
        "generate": ["generate", "-p", "def", "--max-new-tokens", "2"],
    }[command]
    model = knnlm.model_args()[:2]  # explain and generate take no --window
    result = knnlm(*args, *model, *knnlm.store_args(), "--top-k", "1000000000")
    _one_line_error(result, "--top-k", "16384")


# --- 3. damaged stores -----------------------------------------------------------------------


def test_a_truncated_vector_file_is_damage_and_ingest_keeps_the_store_openable(
    knnlm: Knnlm, corpus_dir: Path, tmp_path: Path
) -> None:
    from knn_store.store.edge import EdgeStore

    # the keys themselves in RAM, unquantized, as the collection of the report held them
    plain = ["--quantization", "none", "--no-vectors-on-disk"]
    populated = _json_ok(knnlm.ingest(str(corpus_dir), *plain, "-q", "--json"))
    populated["points"] = populated["points_total"]
    collection = knnlm.data_dir / "test"
    truncate_vector_files(collection)
    _one_line_error(knnlm.info(), "'test'", "damaged", "keys")
    check = knnlm("check", *knnlm.store_args(), "-q")
    assert check.exit_code == 1
    assert "FAIL" in check.stdout and "collection 'test' is damaged" in check.stderr

    new_text = _write(tmp_path / "new.txt", "an entirely new text to store\n" * 4)
    _one_line_error(knnlm.ingest(str(new_text), "-q"), "cannot be read back")
    with EdgeStore(collection, create=False) as store:  # it still opens, nothing was added
        assert store.count() == populated["points"]
    again = knnlm("check", *knnlm.store_args(), "-q")
    assert again.exit_code == 1 and again.stdout == check.stdout  # the same damage, no more


def test_a_deleted_segments_folder_is_reported_by_info_and_check(
    knnlm: Knnlm, populated: dict[str, Any]
) -> None:
    import shutil

    shutil.rmtree(knnlm.data_dir / "test" / "shard" / "segments")
    _one_line_error(knnlm.info(), "'test'", "damaged", "payload index")
    check = knnlm("check", *knnlm.store_args(), "-q")
    assert check.exit_code == 1
    index_line = next(x for x in check.stdout.splitlines() if x.startswith("payload indexes"))
    assert "FAIL" in index_line and "doc" in index_line and "domain" in index_line


OTHER_PROCESS = "another knnlm process"


def test_a_missing_shard_folder_is_named(knnlm: Knnlm, populated: dict[str, Any]) -> None:
    import shutil

    shutil.rmtree(knnlm.data_dir / "test" / "shard")
    line = _one_line_error(knnlm.info(), "shard folder", "is missing")
    assert OTHER_PROCESS not in line


def test_a_corrupt_write_ahead_log_is_named(knnlm: Knnlm, populated: dict[str, Any]) -> None:
    corrupt_wal(knnlm.data_dir / "test")
    line = _one_line_error(knnlm.info(), "write-ahead log", "damaged")
    assert OTHER_PROCESS not in line and "in use" not in line


def test_a_store_opened_twice_in_one_process_is_locked(
    knnlm: Knnlm, populated: dict[str, Any]
) -> None:
    from knn_store.errors import StoreLocked
    from knn_store.store.edge import EdgeStore

    with EdgeStore(knnlm.data_dir / "test", create=False):
        with pytest.raises(StoreLocked, match="in use"):
            EdgeStore(knnlm.data_dir / "test", create=False)
        _one_line_error(knnlm.info(), "in use")


def test_a_store_held_by_another_process_is_locked(knnlm: Knnlm, populated: dict[str, Any]) -> None:
    hold = (
        "import sys\n"
        "from knn_store.store.edge import EdgeStore\n"
        "store = EdgeStore(sys.argv[1], create=False)\n"
        "print('holding', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(knnlm.data_dir / "test")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env_without_knnlm(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        line = _one_line_error(knnlm.info(), "in use by another process")
        assert "damaged" not in line
    finally:
        holder.communicate(timeout=60)
    assert knnlm.info_json() == populated  # free again once the other process is gone


def test_open_damage_is_typed(knnlm: Knnlm, populated: dict[str, Any]) -> None:
    from knn_store.errors import StoreDamaged
    from knn_store.store.edge import EdgeStore

    corrupt_wal(knnlm.data_dir / "test")
    with pytest.raises(StoreDamaged):
        EdgeStore(knnlm.data_dir / "test", create=False)


# --- 4. explain streams ----------------------------------------------------------------------


def test_explain_yields_rows_before_the_whole_text_is_scored(
    knnlm: Knnlm, populated: dict[str, Any], tiny_models: dict[str, Path]
) -> None:
    from knn_store import KnnlmSettings, open_session
    from knn_store.explain import explain_text

    settings = KnnlmSettings(
        model=str(tiny_models["gpt2"]),
        data_dir=knnlm.data_dir,
        model_cache=knnlm.tmp / "cache",
        collection="test",
        window=16,
        stride=8,
        batch_size=1,
        top_k=4,
    )
    long_text = (HELD_OUT + "def add(a, b):\n    return a + b\n") * 20
    with open_session(settings) as session:
        forwards = 0
        forward = session.lm.forward

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal forwards
            forwards += 1
            return forward(*args, **kwargs)

        session.lm.forward = counting  # type: ignore[method-assign]
        rows = explain_text(session.knn_lm, long_text, top=2, show_neighbours=1)
        assert isinstance(rows, Iterator)
        assert forwards == 0  # lazy: nothing is computed before the first row is asked for
        first = next(rows)
        assert first.position == 1
        assert forwards <= 2  # one batch, and the next one the LM computes meanwhile
        rest = list(rows)
    n_tokens = len(session.lm.encode(long_text)) - 1
    assert 1 + len(rest) == n_tokens
    assert forwards >= n_tokens // 8 > 20  # the whole text took many more forwards


def test_explain_prints_rows_and_a_progress_bar(knnlm: Knnlm, populated: dict[str, Any]) -> None:
    text = HELD_OUT * 8
    result = knnlm("explain", "-t", text, *knnlm.model_args(), *knnlm.store_args(), "--top-k", "4")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) > 100
    assert "explain" in result.stderr and "tok" in result.stderr  # tqdm on stderr


# --- 5. Ctrl-C -------------------------------------------------------------------------------


def _big_corpus(root: Path, n_files: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["def", "add", "return", "class", "Stack", "push", "self", "print", "range", "for"]
    for i in range(n_files):
        _write(root / f"f{i:04d}.txt", " ".join(rng.choice(words, size=120)) + f"\n# {i}\n")
    return root


def test_ctrl_c_exits_130_and_a_rerun_resumes(
    knnlm: Knnlm, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from ingest.corpus import read_corpus
    from knn_store import KnnlmSettings, load_language_model

    corpus = _big_corpus(tmp_path / "big", 150)
    args = ["ingest", str(corpus), *knnlm.model_args(), *knnlm.store_args(), "--json"]
    env = _env_without_knnlm(
        KNNLM_MODEL_CACHE=str(tmp_path / "cache"), KNNLM_THREADS="1", KNNLM_UPSERT_BATCH="64"
    )
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "knnlm", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            # a shell that started us in the background may ignore SIGINT: undo that
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 180
        while log.read_bytes().count(b"tok/s") < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "ingest never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    stderr = log.read_text(errors="replace")
    assert proc.returncode == 130, stderr[-2000:]
    assert out == b""
    assert "Traceback" not in stderr and "Aborted" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == "knnlm: interrupted; run the same command again to resume"

    lm = load_language_model(KnnlmSettings(model=str(tiny_models["gpt2"])))
    clean = sum(len(lm.encode(d.text)) - 1 for d in read_corpus([corpus]))
    resumed = _json_ok(knnlm(*args, "-q"))
    assert resumed["points_total"] == clean
    assert 0 < resumed["tokens"] < clean  # the interrupted run had stored some documents
    check = knnlm("check", *knnlm.store_args(), "-q")
    assert check.exit_code == 0, check.output


# --- 6. smaller ones -------------------------------------------------------------------------


LOCAL_SERVER = ["--url", "http://localhost:9", "--timeout", "2"]


def test_api_key_over_http_to_localhost_prints_no_raw_warning(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "knnlm", "info", "--backend", "qdrant", *LOCAL_SERVER],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env_without_knnlm(
            KNNLM_API_KEY="k3y", KNNLM_RETRIES="0", KNNLM_DATA_DIR=str(tmp_path)
        ),
    )
    assert proc.returncode == 1
    assert "UserWarning" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.splitlines()[-1]], proc.stderr
    assert proc.stderr.startswith("knnlm: error: cannot reach Qdrant at http://localhost:9")


def test_api_key_over_http_to_another_host_is_refused(knnlm: Knnlm) -> None:
    url = ["--backend", "qdrant", "--url", "http://qdrant.example:6333"]
    result = knnlm("info", *url, env={"KNNLM_API_KEY": "k3y"})
    _one_line_error(result, "refusing to send the API key unencrypted", "--allow-insecure-api-key")


def _inactive_rpc_error(details: str) -> Exception:
    """A real grpc error object, as the channel raises it when a call fails."""
    import grpc
    from grpc import _channel

    state = _channel._RPCState((), None, None, grpc.StatusCode.UNAVAILABLE, details)
    state.debug_error_string = "UNKNOWN:Error received from peer {grpc_status:14}"
    return _channel._InactiveRpcError(state)


def test_grpc_errors_are_told_in_one_whole_line() -> None:
    import grpc

    from knn_store.errors import StoreUnavailable
    from knn_store.store.client import QdrantClientStore
    from knn_store.store.client_errors import describe_error

    details = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:6334:\n"
        "    Failed to connect to remote host: Connection refused"
    )
    error = _inactive_rpc_error(details)
    assert isinstance(error, grpc.RpcError) and "\n" in str(error)
    line = describe_error(error)
    assert "\n" not in line
    assert line.startswith("gRPC UNAVAILABLE: failed to connect to all addresses")
    assert line.endswith("Failed to connect to remote host: Connection refused")

    class Unreachable:
        def collection_exists(self, name: str) -> bool:
            raise error

    with pytest.raises(StoreUnavailable) as caught:
        QdrantClientStore(
            Unreachable(), collection="c", location="grpc://x", local=False, retries=0
        )
    message = str(caught.value)
    assert "\n" not in message and "Connection refused" in message and "UNAVAILABLE" in message


def test_a_real_grpc_failure_is_one_line(knnlm: Knnlm) -> None:
    url = ["--backend", "qdrant", "--url", "http://127.0.0.1:9", "--prefer-grpc"]
    result = knnlm("info", *url, "--retries", "0", "--timeout", "2")
    _one_line_error(result, "gRPC UNAVAILABLE", "127.0.0.1:6334")


def test_lambda_nan_is_refused_as_not_a_finite_number(knnlm: Knnlm, tmp_path: Path) -> None:
    text = _write(tmp_path / "held.txt", HELD_OUT)
    line = _one_line_error(knnlm.eval(str(text), "--lambda", "nan", "-q"), "--lambda", "finite")
    assert "less than or equal" not in line


@pytest.mark.parametrize("name", [" ", "", "a b", "..", "."])
def test_a_blank_or_odd_collection_name_is_refused(knnlm: Knnlm, tmp_path: Path, name: str) -> None:
    text = _write(tmp_path / "held.txt", HELD_OUT)
    store = ["--data-dir", str(knnlm.data_dir), "--collection", name]
    _one_line_error(knnlm("ingest", str(text), *knnlm.model_args(), *store, "-q"), "--collection")
    assert not knnlm.data_dir.exists()  # no folder named like that, nor any other


def test_skipped_files_are_named(knnlm: Knnlm, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _write(folder / "good.txt", "def add(a, b):\n    return a + b\n")
    _write(folder / "blob.bin", b"\x7fELF\x00\x00\x01")
    _write(folder / "latin1.txt", b"caf\xe9\n")
    _write(folder / "empty.txt", "")
    result = knnlm.ingest(str(folder), "--skip-invalid", "-q", "--json")
    out = _json_ok(result)
    assert out["skipped_files"] == 3
    reasons = out["skipped"]
    assert set(reasons) == {str(folder / n) for n in ("blob.bin", "latin1.txt", "empty.txt")}
    assert "binary" in reasons[str(folder / "blob.bin")]
    assert "UTF-8" in reasons[str(folder / "latin1.txt")]
    named = [line for line in result.stderr.splitlines() if line.startswith("knnlm: skipped")]
    assert len(named) == 2
    assert any("blob.bin" in line for line in named)
    assert any("latin1.txt" in line for line in named)


def test_lambda_one_explains_its_infinite_perplexity(
    knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path
) -> None:
    text = _write(tmp_path / "held.txt", "zzz qqq xxx " * 5)  # tokens no neighbour predicts
    result = knnlm.eval(str(text), "--lambda", "1.0", "--top-k", "2", "-q", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["knn_perplexity"] is None  # infinite: strict JSON has null for it
    assert out["zero_probability_tokens"] > 0
    note = result.stderr.strip().splitlines()[-1]
    assert note.startswith("knnlm: note:")
    assert "lambda 1" in note and "no neighbour" in note


def test_eval_json_is_strict_json(knnlm: Knnlm, populated: dict[str, Any], tmp_path: Path) -> None:
    text = _write(tmp_path / "held.txt", "zzz qqq xxx " * 5)
    result = knnlm.eval(str(text), "--lambda", "1.0", "--top-k", "2", "-q", "--json")

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    out = json.loads(result.stdout, parse_constant=refuse)
    assert result.exit_code == 0 and isinstance(out, dict)
    assert out["knn_perplexity"] is None and out["base_perplexity"] > 0
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout
