"""Shared fixtures: tiny real models saved to disk, corpora, and settings pointing at temp dirs.

The tiny models are built from configs (GPT-2 and Llama layouts) with a byte-level BPE
tokenizer trained here, saved with ``save_pretrained`` and loaded back through the same
``--model <folder>`` path that users take.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS_LINES = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    return a * b\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    print(i, i * i)\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
]


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def build_tiny_model(directory: Path, arch: str, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny causal LM of ``arch`` ('gpt2' or 'llama')."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = _train_tokenizer(CORPUS_LINES)
    vocab = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def half_skipping_gate(lm, text: str):
    """A retrieval gate that skips the surer half of ``text``'s positions (those whose LM
    entropy is below the median), as if ``knnlm tune`` had fitted it."""
    import torch

    from knn_store.gate import RetrievalGate
    from knn_store.knn_lm import lm_summary

    out = lm.forward(lm.encode(text)[None], with_logits=True)
    assert out.logits is not None
    entropy, _ = lm_summary(torch.log_softmax(out.logits[0].float(), dim=-1))
    return RetrievalGate(
        [float(entropy.median()), 0.0], [1e-3, 1.0], [1.0, 0.0], 0.0, threshold=0.5
    )


@pytest.fixture(autouse=True)
def _no_knnlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test decides the KNNLM_* variables it runs with."""
    for name in list(os.environ):
        if name.upper().startswith("KNNLM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("gpt2", "llama")}


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    return tiny_models[request.param]


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder of small text files (the datastore), plus nested files and an empty one."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, line in enumerate(CORPUS_LINES):
        (root / f"doc{i}.txt").write_text(line * 3)
    (root / "sub" / "nested.txt").write_text("def add(a, b):\n    return a + b\n" * 2)
    (root / "empty.txt").write_text("")
    return root


@pytest.fixture
def settings_factory(tmp_path: Path):
    """KnnlmSettings for a tiny model with data in a temp dir; keyword overrides apply."""
    from knn_store import KnnlmSettings

    def make(model: Path, **overrides):
        base = dict(
            model=str(model),
            data_dir=tmp_path / "data",
            model_cache=tmp_path / "cache",
            window=16,
            stride=8,
            top_k=8,
            collection="test",
        )
        base.update(overrides)
        return KnnlmSettings(**base)

    return make


@pytest.fixture
def mute_server() -> Iterator[str]:
    """The URL of a TCP server on loopback that accepts every connection and never answers
    (a server that hangs)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


# --- real Qdrant servers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def qdrant_server(tmp_path_factory: pytest.TempPathFactory):
    """A Qdrant server for the whole session: ``QDRANT_URL`` when set, else a ``qdrant``
    process started here (strict mode on, as on Qdrant Cloud), else the test is skipped."""
    from tests.qdrant_server import EXTERNAL_URL, QdrantNode, Server, find_binary, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if EXTERNAL_URL:
        yield Server.external()
        return
    binary = find_binary()
    assert binary is not None
    node = QdrantNode(binary, tmp_path_factory.mktemp("qdrant"), strict_mode=True).start()
    try:
        yield Server.of(node)
    finally:
        node.stop()


@pytest.fixture(scope="session")
def qdrant_binary():
    """The qdrant executable for tests that start their own servers (TLS, clusters)."""
    from tests.qdrant_server import find_binary, skip_reason

    binary = find_binary()
    if binary is None:
        pytest.skip(skip_reason() or "these tests start their own qdrant: put it on PATH")
    return binary


# --- one line on the server tests ------------------------------------------------------------

_SERVER_OUTCOMES: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Count each server-marked test once: its call, or the setup that skipped or broke it."""
    report = yield
    if item.get_closest_marker("server") is None:
        return report
    if report.when == "call" or (report.when == "setup" and not report.passed):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _SERVER_OUTCOMES[report.outcome].append(reason)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Whether the server tests ran, or skipped and why, on one line (CI prints it)."""
    passed, failed, skipped = (_SERVER_OUTCOMES[k] for k in ("passed", "failed", "skipped"))
    if not (passed or failed or skipped):
        return
    line = f"server tests: {len(passed) + len(failed)} ran ({len(failed)} failed), "
    line += f"{len(skipped)} skipped"
    reasons = sorted(set(skipped), key=skipped.count, reverse=True)
    if reasons:
        line += ": " + "; ".join(f"{skipped.count(r)} as {r}" for r in reasons)
    terminalreporter.write_line(line)
