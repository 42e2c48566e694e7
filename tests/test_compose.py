"""The README's ``docker compose`` server, for real: ``up -d`` of a temporary copy of
docker-compose.yml, then the README's server commands exactly as written (through bash, the
venv's ``knnlm`` on PATH), the data kept across ``down`` and ``up``, removed by ``down -v``;
and an API key that the server requires when ``QDRANT_API_KEY`` is set for ``up``.

Skips, and says why, without Docker (or its compose), without a reachable daemon, without the
image that docker-compose.yml names in the local image store (nothing is pulled), or when
127.0.0.1:6333 or :6334 is taken (the README's commands use those ports).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin, where `knnlm` is installed
PORTS = (6333, 6334)
URL = "http://localhost:6333"
HEALTHY_WITHIN_S = 120
# The README's server block, without its comments; the first line is run by the test itself.
README_COMMANDS = [
    "docker compose up -d",
    "export KNNLM_BACKEND=qdrant KNNLM_URL=http://localhost:6333",
    "knnlm ingest corpus/ && knnlm eval held-out/",
    "knnlm push --backend edge --collection docs --to-url http://localhost:6333",
]

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _runs(*command: str) -> bool:
    try:
        done = subprocess.run(command, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _compose_command() -> list[str] | None:
    """``docker compose`` (Compose v2), else ``docker-compose`` (v1), else None."""
    if shutil.which("docker") and _runs("docker", "compose", "version"):
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _runs("docker-compose", "version"):
        return ["docker-compose"]
    return None


def _image() -> str:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]["qdrant"]["image"]


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    if not _runs("docker", "info"):
        return "the Docker daemon is unreachable (`docker info` fails)"
    if _compose_command() is None:
        return "neither `docker compose` nor `docker-compose` works"
    image = _image()
    if not _runs("docker", "image", "inspect", image):
        return f"image {image} (named in docker-compose.yml) is not in the local image store"
    for port in PORTS:
        if _port_taken(port):
            return f"127.0.0.1:{port} is taken; the README's commands need it free for compose"
    if not (BIN / "knnlm").exists():
        return f"no knnlm in {BIN}"
    return None


@pytest.fixture(scope="module")
def compose_command() -> list[str]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    command = _compose_command()
    assert command is not None
    return command


class Compose:
    """One compose project (a unique ``-p`` name) on a temporary copy of docker-compose.yml."""

    def __init__(self, command: list[str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.folder = folder
        self.file = folder / "docker-compose.yml"
        shutil.copyfile(COMPOSE_FILE, self.file)
        self.project = f"knnlm-test-{uuid.uuid4().hex[:10]}"
        self.volume = f"{self.project}_qdrant_storage"

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # Not the caller's QDRANT_API_KEY (the server tests' variable): only what `env` says.
        full_env = {k: v for k, v in os.environ.items() if k != "QDRANT_API_KEY"}
        full_env.update(env or {})
        done = subprocess.run(
            [*self.command, "-f", str(self.file), "-p", self.project, *args],
            cwd=self.folder,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check:
            assert done.returncode == 0, f"compose {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    def container(self) -> str:
        cid = self("ps", "-q", "qdrant").stdout.strip()
        assert cid, f"no qdrant container in project {self.project}"
        return cid

    def inspect(self, template: str) -> str:
        return _docker("inspect", "-f", template, self.container()).strip()

    def up(self, env: dict[str, str] | None = None) -> float:
        """``up -d``, then wait for the healthcheck; the seconds it took."""
        start = time.monotonic()
        self("up", "-d", env=env)
        while True:
            status = self.inspect("{{.State.Status}} {{.State.Health.Status}}")
            if status == "running healthy":
                return time.monotonic() - start
            if status.split()[0] != "running" or status.endswith(" unhealthy"):
                break
            if time.monotonic() - start > HEALTHY_WITHIN_S:
                break
            time.sleep(0.5)
        logs = self("logs", "--tail", "40", check=False).stdout
        pytest.fail(f"qdrant is {status!r} after {time.monotonic() - start:.0f}s:\n{logs}")

    def volume_exists(self) -> bool:
        return _runs("docker", "volume", "inspect", self.volume)


def _docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stderr}"
    return done.stdout


@pytest.fixture
def compose(compose_command: list[str], tmp_path: Path) -> Iterator[Compose]:
    project = Compose(compose_command, tmp_path / "compose")
    try:
        yield project
    finally:
        project("down", "-v", "--remove-orphans", check=False)
        assert not project.volume_exists(), f"volume {project.volume} left behind"


@pytest.fixture
def workdir(tmp_path: Path, corpus_dir: Path) -> Path:
    """The folder the README's commands run in: corpus/ (the fixture's) and held-out/."""
    assert corpus_dir == tmp_path / "corpus"
    held = tmp_path / "held-out"
    held.mkdir()
    (held / "a.txt").write_text("def add(a, b):\n    return a + b\n")
    (held / "b.txt").write_text("for i in range(10):\n    print(i, i * i)\n")
    return tmp_path


def _knnlm_env(tmp: Path, model: Path, **extra: str) -> dict[str, str]:
    """The environment of a shell in which the README's commands are typed: the tiny model
    and temporary folders given as KNNLM_* variables, so the commands stay as written."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("KNNLM_", "QDRANT_"))  # only what this test sets
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        KNNLM_MODEL=str(model),
        KNNLM_WINDOW="16",
        KNNLM_STRIDE="8",
        KNNLM_DATA_DIR=str(tmp / "knnlm-data"),
        KNNLM_MODEL_CACHE=str(tmp / "knnlm-cache"),
    )
    env.update(extra)
    return env


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _json(script: str, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    return json.loads(_ok(_bash(script, cwd, env)))


def _readme_server_block() -> list[str]:
    """The lines of the README's first code block under "A Qdrant server", comments and all."""
    section = README.read_text().split("\n## A Qdrant server", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_server_commands_and_data_across_restarts(
    compose: Compose, workdir: Path, tiny_models: dict[str, Path]
) -> None:
    lines = _readme_server_block()
    assert [line.split("#", 1)[0].strip() for line in lines] == README_COMMANDS
    env = _knnlm_env(workdir, tiny_models["llama"])
    # What the push line copies: an embedded collection 'docs'.
    _ok(_bash("knnlm ingest corpus/ --backend edge --collection docs -q", workdir, env))
    edge = _json("knnlm info --backend edge --collection docs --json", workdir, env)

    healthy_s = compose.up()
    print(f"compose up -d: healthy in {healthy_s:.1f}s")
    ports = _docker("port", compose.container()).split()
    published = [p for p in ports if ":" in p]
    assert sorted(published) == ["127.0.0.1:6333", "127.0.0.1:6334"], ports
    assert "QDRANT__TELEMETRY_DISABLED=true" in compose.inspect("{{json .Config.Env}}")

    # The README's lines, verbatim, in one shell (the export carries over); each line's exit
    # status is checked, since `set -e` does not stop a failed `a && b` list.
    script = "\n".join(f"{line}\nrc=$?; [ $rc = 0 ] || exit $rc" for line in lines[1:])
    readme = _bash(script, workdir, env)
    out = _ok(readme)
    assert "into 'knnlm'" in out, out
    readme_ppl = float(re.search(r"^kNN-LM\s+([0-9.]+)", out, re.M).group(1))  # type: ignore[union-attr]

    server = {**env, "KNNLM_BACKEND": "qdrant", "KNNLM_URL": URL}

    def state() -> tuple[dict[str, Any], float]:
        """`info` (points, server version) of both server collections; eval's perplexity."""
        info = {}
        for name in ("knnlm", "docs"):
            shown = _json(f"knnlm info --collection {name} --json", workdir, server)
            info[name] = (shown["points"], shown["server_version"])
        scored = _json("knnlm eval held-out/ --json -q", workdir, server)
        return info, scored["knn_perplexity"]

    info, ppl = state()
    version = _image().rsplit(":v", 1)[1]
    assert info["knnlm"] == (edge["points"], version)  # the same corpus and model
    assert info["docs"] == (edge["points"], version)  # pushed
    assert edge["points"] > 0
    assert ppl == pytest.approx(readme_ppl, abs=1e-3)  # eval prints 3 decimals
    grpc = _json("knnlm info --prefer-grpc --json", workdir, server)  # the published 6334
    assert grpc["points"] == edge["points"]

    compose("down")
    assert compose.volume_exists()
    healthy_s = compose.up()
    print(f"compose up -d after down: healthy in {healthy_s:.1f}s")
    info_after, ppl_after = state()
    assert info_after == info
    assert ppl_after == pytest.approx(ppl, rel=1e-9)


def test_api_key_from_the_environment_of_up(
    compose: Compose, workdir: Path, tiny_models: dict[str, Path]
) -> None:
    key = secrets.token_urlsafe(24)
    env = _knnlm_env(workdir, tiny_models["llama"])
    _ok(_bash("knnlm ingest corpus/ --backend edge --collection docs -q", workdir, env))
    edge = _json("knnlm info --backend edge --collection docs --json", workdir, env)
    compose.up(env={"QDRANT_API_KEY": key})  # healthy: /readyz needs no key
    server = {**env, "KNNLM_BACKEND": "qdrant", "KNNLM_URL": URL}
    with_key = {**server, "KNNLM_API_KEY": key, "KNNLM_TO_API_KEY": key}

    push = "knnlm push --backend edge --collection docs --to-url http://localhost:6333 -q"
    _ok(_bash(push, workdir, with_key))
    info = "knnlm info --collection docs"
    assert _json(f"{info} --json", workdir, with_key)["points"] == edge["points"]

    for denied_env in (server, {**server, "KNNLM_API_KEY": "not-" + key}):
        denied = _bash(info, workdir, denied_env)
        assert denied.returncode == 1, denied.stdout + denied.stderr
        lines = denied.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("knnlm: error:"), denied.stderr
        assert "refused the API key" in lines[0], lines[0]
        assert key not in denied.stdout + denied.stderr
