"""A real `escrow serve` on loopback over TLS, set up through the real CLI."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from escrow import custodian_keys
from escrow.api_client import CustodianClient
from escrow.core.files import write_atomic
from lab.certs import Issued, make_node_cert, make_root_ca
from lab.commands import REPO, run_escrow
from lab.net import free_port

PASSPHRASE = "correct horse battery staple"
# A boot id as the kernel writes it (/proc/sys/kernel/random/boot_id).
BOOT_ID = "3f0c8a52-1d4e-4b6a-9c7e-0a1b2c3d4e51"


def swarm_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(25))


@dataclass
class Node:
    cluster_id: str
    node_id: str
    cert: Issued
    agent_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    hostname: str = "manager-1"

    @property
    def cert_pem(self) -> str:
        return self.cert.pem.decode("ascii")


@dataclass
class Cluster:
    cluster_id: str
    ca: Issued

    def node(self, role: str = "swarm-manager", **kwargs: object) -> Node:
        node_id = swarm_id()
        return Node(self.cluster_id, node_id,
                    make_node_cert(self.ca, node_id, self.cluster_id, role, **kwargs))  # type: ignore[arg-type]


@dataclass
class EscrowProcess:
    base: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_escrow(*args, data_dir=self.data_dir, stdin=stdin)

    def custodian(self, name: str) -> Path:
        """Make and register a custodian; return their private key path."""
        # One bcrypt round: a throwaway key, opened by hundreds of the suite's commands.
        private, public = custodian_keys.generate(PASSPHRASE.encode(), kdf_rounds=1)
        key = self.base / name
        key.write_bytes(private)
        key.chmod(0o600)
        (self.base / f"{name}.pub").write_bytes(public)
        result = self.cli("custodian", "add", name, "--public-key", str(self.base / f"{name}.pub"))
        assert result.returncode == 0, result.stderr
        return key

    def custodian_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        """The private key of custodian ``name`` (made by :meth:`custodian`)."""
        return custodian_keys.load_private((self.base / name).read_bytes(), PASSPHRASE.encode())

    def api_as(self, name: str) -> CustodianClient:
        """The API as custodian ``name``, for what the CLI never sends (forged facts, say)."""
        return CustodianClient(self.url, str(self.ca), self.custodian_key(name))

    def as_custodian(self, name: str, *args: str, via: EscrowProcess | None = None,
                     stdin: str = "") -> subprocess.CompletedProcess[str]:
        """A custodian command of ``name`` (made by :meth:`custodian`), sent to this escrow
        or to its replica ``via``, with ``stdin`` on its standard input."""
        to = via or self
        return run_escrow(*args, "--url", to.url, "--ca", str(to.ca), "--key",
                          str(self.base / name), "--passphrase-file", str(self.base / "pass"),
                          stdin=stdin)

    def cluster(self, threshold: int, slots: str, *extra: str) -> Cluster:
        cluster = Cluster(swarm_id(), make_root_ca())
        path = self.base / f"{cluster.cluster_id}.pem"
        path.write_bytes(cluster.ca.pem)
        result = self.cli("cluster", "add", cluster.cluster_id, "--root-ca", str(path),
                          "--threshold", str(threshold), "--slots", slots, *extra)
        assert result.returncode == 0, result.stderr
        return cluster

    def webhook(self, name: str, url: str, events: Sequence[str] = (),
                secret: bytes | None = None) -> bytes:
        """Add receiver ``name`` to escrow.toml as README's "Notifications" says, with its
        signing secret (a fresh one unless given: replicas share a receiver's) in a file of
        its own, 0600; return the secret. Takes effect at the next start."""
        secret = secret or secrets.token_hex(32).encode()
        path = self.base / f"webhook-{name}.secret"
        path.touch(0o600)
        path.write_bytes(secret + b"\n")
        config = self.data_dir / "escrow.toml"
        raw = tomllib.loads(config.read_text())
        raw.setdefault("webhooks", []).append(
            {"name": name, "url": url, "secret_file": str(path)}
            | ({"events": list(events)} if events else {}))
        config.write_text(tomli_w.dumps(raw))
        return secret

    def command(self) -> list[str]:
        """What runs the server: the pid of its first word is the server's."""
        return [sys.executable, "-m", "escrow", "serve", "--data-dir", str(self.data_dir),
                "--listen", f"127.0.0.1:{self.port}"]

    def start(self, *, healthy: bool = True) -> None:
        """Start serving; wait until /healthz says ok, or only until it answers at all."""
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        env.update(self.env)
        with (self.base / "serve.log").open("ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=REPO, env=env,
                                            stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("escrow serve exited:\n" + self.log())
            try:
                status, _ = self.health()
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200 or not healthy:
                return
            time.sleep(0.1)
        raise RuntimeError("escrow serve did not become healthy:\n" + self.log())

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz's status and JSON body; OSError while nothing listens."""
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(self.url + "/healthz", context=context,  # noqa: S310
                                        timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def audit(self, prefix: str = "", last: int = 100000) -> list[tuple[str, dict[str, Any]]]:
        """(event, details) of the `last` newest audit records, oldest first, whose event
        starts with prefix."""
        result = self.cli("audit", "show", "--json", "--limit", str(last))
        assert result.returncode == 0, result.stderr
        return [(r["event"], r["details"]) for r in json.loads(result.stdout)
                if r["event"].startswith(prefix)]

    def viewer(self, name: str) -> str:
        """Add viewer ``name`` (`escrow viewer add`); return their token."""
        path = self.base / f"viewer-{name}.token"
        result = self.cli("viewer", "add", name, "--token-file", str(path))
        assert result.returncode == 0, result.stderr
        return path.read_text().strip()

    def fleet(self, token: str | None) -> tuple[int, dict[str, Any]]:
        """GET /v1/status with ``token`` as a viewer's (none: no Authorization header)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        request = urllib.request.Request(self.url + "/v1/status",  # noqa: S310 - https://
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, context=context,  # noqa: S310
                                        timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when it has not been counted yet)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        with urllib.request.urlopen(self.url + "/metrics", context=context,  # noqa: S310
                                    timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def log(self) -> str:
        path = self.base / "serve.log"
        return path.read_text() if path.exists() else ""


def make_escrow(base: Path, *init: str, **env: str) -> EscrowProcess:
    """An escrow made by `escrow init` with the options `init`, not yet serving."""
    # Tests play many agents from one loopback address: the per-source limit is off unless a
    # test sets it (tests/integration/test_hostile_clients.py does).
    env.setdefault("ESCROW_REQUESTS_SOURCE_RATE", "0")
    escrow = EscrowProcess(base, free_port(), env)
    result = run_escrow("init", "--data-dir", str(escrow.data_dir), *init)
    assert result.returncode == 0, result.stderr
    # The custodians' passphrase file: a secret, 0600 from its first byte.
    write_atomic(base / "pass", PASSPHRASE.encode() + b"\n")
    return escrow


def make_replica(first: EscrowProcess, base: Path, store_url: str, password_file: Path,
                 **env: str) -> EscrowProcess:
    """Another replica of ``first`` (an escrow on the PostgreSQL store ``store_url``), made as
    README's "Run several replicas" says: `escrow init --join` with a copy of its token."""
    copied = base / "token-copy"
    shutil.copytree(first.data_dir / "softhsm", copied / "softhsm")
    shutil.copy2(first.data_dir / "hsm-pin", copied / "hsm-pin")
    env.setdefault("ESCROW_REQUESTS_SOURCE_RATE", "0")
    replica = EscrowProcess(base, free_port(), env)
    result = run_escrow("init", "--data-dir", str(replica.data_dir), "--store-url", store_url,
                        "--store-password-file", str(password_file), "--join",
                        "--token-from", str(copied / "softhsm"))
    assert result.returncode == 0, result.stderr
    shutil.rmtree(copied)
    return replica
