"""Real Qdrant servers for the tests: one given by ``QDRANT_URL``, or processes of a ``qdrant``
executable started here on free loopback ports.

The binary is ``KNNLM_TEST_QDRANT_BIN`` or the first ``qdrant`` on PATH; without either (and
without ``QDRANT_URL``) the server tests skip and say why, and where one is given, a server
that cannot start fails them. Every process is configured through
``QDRANT__*`` variables only: all its ports (REST, gRPC, peer-to-peer) on 127.0.0.1, storage
and snapshots in a temporary folder, telemetry off. A node can be killed (SIGKILL), stopped
(SIGTERM) and started again on the same ports and storage, which the cluster tests need.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

# Read at import: the suite's autouse fixture clears every KNNLM_* variable before a test.
_BINARY_ENV = os.environ.get("KNNLM_TEST_QDRANT_BIN")
EXTERNAL_URL = os.environ.get("QDRANT_URL")
EXTERNAL_API_KEY = os.environ.get("QDRANT_API_KEY")
EXTERNAL_GRPC_PORT = os.environ.get("QDRANT_GRPC_PORT")
HOST = "127.0.0.1"


def find_binary() -> Path | None:
    """The qdrant executable the tests may start, or None where none is named or on PATH.
    One that is named (``KNNLM_TEST_QDRANT_BIN``) but cannot run fails the run instead."""
    if _BINARY_ENV:
        path = Path(_BINARY_ENV)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(
                f"KNNLM_TEST_QDRANT_BIN={_BINARY_ENV} is not an executable file: the server "
                "tests were asked to run and cannot"
            )
        return path
    found = shutil.which("qdrant")
    return Path(found) if found else None


def skip_reason() -> str | None:
    """Why no server test can run here, or None when one can: a server named (``QDRANT_URL``,
    ``KNNLM_TEST_QDRANT_BIN``) or on PATH must run, and a test that cannot start it fails."""
    if EXTERNAL_URL or find_binary():
        return None
    return (
        "no Qdrant server: set QDRANT_URL (and QDRANT_API_KEY), or put a `qdrant` executable "
        "on PATH (or name it in KNNLM_TEST_QDRANT_BIN)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Tls:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost, made with openssl."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> Tls:
        folder.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
        key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
        ext = folder / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        ca = ["-keyout", str(ca_key), "-out", str(ca_cert)]
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca", *ca
        )
        request = ["-keyout", str(key), "-out", str(csr)]
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", *request)
        signing = ["-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2"]
        openssl("x509", "-req", "-in", str(csr), *signing, "-extfile", str(ext), "-out", str(cert))
        return cls(ca_cert=ca_cert, cert=cert, key=key)


def jwt_token(secret: str, claims: dict[str, object]) -> str:
    """An HS256 JSON Web Token signed with ``secret`` (Qdrant signs with its API key)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{b64(signature.digest())}"


@dataclass
class QdrantNode:
    """One qdrant process on loopback. ``start()`` it; ``kill()``/``stop()`` and ``start()``
    again reuse its ports and storage."""

    binary: Path
    root: Path
    api_key: str | None = None
    tls: Tls | None = None
    jwt_rbac: bool = False
    strict_mode: bool = False
    cluster: bool = False
    bootstrap: str | None = None  # another node's p2p URI, to join its cluster
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    p2p_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.http_port}"

    @property
    def p2p_uri(self) -> str:
        return f"http://{HOST}:{self.p2p_port}"

    @property
    def log(self) -> Path:
        return self.root / "qdrant.log"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QDRANT__")}
        env.update(
            QDRANT__SERVICE__HOST=HOST,
            QDRANT__SERVICE__HTTP_PORT=str(self.http_port),
            QDRANT__SERVICE__GRPC_PORT=str(self.grpc_port),
            QDRANT__CLUSTER__P2P__PORT=str(self.p2p_port),
            QDRANT__CLUSTER__ENABLED="true" if self.cluster else "false",
            QDRANT__STORAGE__STORAGE_PATH=str(self.root / "storage"),
            QDRANT__STORAGE__SNAPSHOTS_PATH=str(self.root / "snapshots"),
            QDRANT__STORAGE__TEMP_PATH=str(self.root / "tmp"),
            QDRANT__TELEMETRY_DISABLED="true",
            QDRANT__LOG_LEVEL="WARN",
        )
        if self.cluster:
            # Two cores: fast consensus ticks keep shard transfers and elections short.
            env["QDRANT__CLUSTER__CONSENSUS__TICK_PERIOD_MS"] = "50"
        if self.api_key:
            env["QDRANT__SERVICE__API_KEY"] = self.api_key
        if self.jwt_rbac:
            env["QDRANT__SERVICE__JWT_RBAC"] = "true"
        if self.strict_mode:
            env["QDRANT__STORAGE__COLLECTION__STRICT_MODE__ENABLED"] = "true"
            env["QDRANT__STORAGE__COLLECTION__STRICT_MODE__UNINDEXED_FILTERING_RETRIEVE"] = "false"
            env["QDRANT__STORAGE__COLLECTION__STRICT_MODE__UNINDEXED_FILTERING_UPDATE"] = "false"
        if self.tls:
            env.update(
                QDRANT__SERVICE__ENABLE_TLS="true",
                QDRANT__TLS__CERT=str(self.tls.cert),
                QDRANT__TLS__KEY=str(self.tls.key),
                QDRANT__TLS__CA_CERT=str(self.tls.ca_cert),
            )
        return env

    def start(self, *, timeout: float = 90.0) -> QdrantNode:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.root.mkdir(parents=True, exist_ok=True)
        args = [str(self.binary), "--disable-telemetry"]
        if self.cluster:
            args += ["--uri", self.p2p_uri]
            if self.bootstrap and not (self.root / "storage" / "raft_state.json").exists():
                args += ["--bootstrap", self.bootstrap]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                cwd=self.root,  # no config/ folder there: the built-in defaults and the env
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        verify: ssl.SSLContext | bool = True
        if self.tls:
            verify = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"qdrant exited with {self.process.returncode}:\n{self.tail_log()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", verify=verify, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"qdrant not ready after {timeout:.0f}s:\n{self.tail_log()}")

    def tail_log(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass(frozen=True)
class Server:
    """What a test needs to reach a server: its URL, gRPC port, key and CA."""

    url: str
    grpc_port: int
    api_key: str | None = None
    ca_cert: Path | None = None

    @classmethod
    def of(cls, node: QdrantNode, api_key: str | None = None) -> Server:
        return cls(
            url=node.url,
            grpc_port=node.grpc_port,
            api_key=api_key if api_key is not None else node.api_key,
            ca_cert=node.tls.ca_cert if node.tls else None,
        )

    @classmethod
    def external(cls) -> Server:
        assert EXTERNAL_URL is not None
        port = urlsplit(EXTERNAL_URL).port or 6333
        grpc = int(EXTERNAL_GRPC_PORT) if EXTERNAL_GRPC_PORT else port + 1
        return cls(url=EXTERNAL_URL, grpc_port=grpc, api_key=EXTERNAL_API_KEY)

    def cli_args(self, *, grpc: bool = False) -> list[str]:
        """``knnlm`` flags that reach this server (the key goes through the environment)."""
        args = ["--backend", "qdrant", "--url", self.url, "--timeout", "60"]
        args += ["--grpc-port", str(self.grpc_port)]
        if grpc:
            args.append("--prefer-grpc")
        if self.ca_cert:
            args += ["--ca-cert", str(self.ca_cert)]
        return args

    def env(self) -> dict[str, str]:
        return {"KNNLM_API_KEY": self.api_key} if self.api_key else {}

    def client(self, *, grpc: bool = False):
        from qdrant_client import QdrantClient

        kwargs: dict[str, object] = {}
        if self.ca_cert:
            kwargs["verify"] = ssl.create_default_context(cafile=str(self.ca_cert))
        return QdrantClient(
            url=self.url,
            api_key=self.api_key,
            grpc_port=self.grpc_port,
            prefer_grpc=grpc,
            check_compatibility=False,
            **kwargs,
        )

    def drop_collections(self, prefix: str) -> None:
        client = self.client()
        try:
            for c in client.get_collections().collections:
                if c.name.startswith(prefix):
                    client.delete_collection(c.name)
        finally:
            client.close()
