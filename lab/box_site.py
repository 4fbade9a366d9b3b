"""The booted box seen as an operator sees it (units, docker, the escrow's CLI, the journal),
and the install README's "Install with systemd" describes, read from README itself and run
line by line so that README, the tests and the benchmarks cannot drift apart. The box has no
network: wheels are built on the host and bound in."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lab.box import Box
from lab.commands import REPO, readme_blocks
from lab.runbook import Command

ESCROW = "/opt/swarm-unseal/bin/escrow"
AGENT = "/opt/swarm-unseal/bin/unseal-agent"
CUSTODIANS = "/srv/custodians"
PASSPHRASE = "correct horse battery staple"  # the test custodians' key passphrase
AGENT_CONFIG = """\
escrow_url = "https://127.0.0.1:8443"
escrow_ca = "/etc/unseal-agent/escrow-ca.pem"
"""


class Site:
    """The box seen as an operator sees it: units, docker, the escrow's CLI, the journal."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.cluster_id = ""
        self.unlock_keys: set[str] = set()

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.box.sh(script)

    def type(self, command: Command, *, stdin: str | None = None, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A runbook's command as the operator types it into root's shell on this host."""
        return self.box.run(["bash", "-c", command.text], stdin=stdin, check=check, env=env)

    def type_as_custodian(self, command: Command, *, name: str = "alice",
                          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """A runbook's command as custodian `name` types it in a terminal of their own, where
        `escrow` is a command on the PATH (pip installed it; here the box's venv) and their
        ESCROW_* variables are set (a page's own `export` comes first)."""
        return self.box.run(["bash", "-c", command.text], stdin=stdin, env={
            **_custodian_env(name), "PATH": f"/opt/swarm-unseal/bin:{self.box.PATH}",
            # No terminal here to type it at.
            "ESCROW_PASSPHRASE_FILE": f"{CUSTODIANS}/passphrase"})

    def escrow_admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """An escrow administration command, run as the escrow's own user as README says."""
        return self.box.run(["runuser", "-u", "escrow", "--", ESCROW, *args])

    def custodian(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.box.run([ESCROW, *args, "--passphrase-file", f"{CUSTODIANS}/passphrase"],
                            env=_custodian_env(name))

    def restart_docker(self) -> None:
        """`systemctl restart docker`, past docker's start limit (3 in 60 s): tests restart it
        far more often than that limit is about."""
        self.box.run(["systemctl", "reset-failed", "docker"])
        self.box.run(["systemctl", "restart", "docker"])

    def unlock_key(self) -> str:
        return self.box.run(["docker", "swarm", "unlock-key", "-q"]).stdout.strip()

    def audit(self, limit: int = 1000) -> list[dict[str, object]]:
        """The escrow's newest audit records, as `escrow audit show --json` gives them."""
        records: list[dict[str, object]] = json.loads(
            self.escrow_admin("audit", "show", "--json", "--limit", str(limit)).stdout)
        return records

    def unit(self, name: str, *props: str) -> dict[str, str]:
        shown = self.box.run(["systemctl", "show", name, *(f"--property={p}" for p in props)])
        return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)

    def wait_unit(self, name: str, ready: Callable[[dict[str, str]], bool], *props: str,
                  timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.unit(name, *props)
            if ready(shown):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never got there: {shown}\n"
                                     f"{self.journal_text(name)[-3000:]}")
            time.sleep(0.1)

    def swarm_state(self) -> str:
        """The node's swarm state, asking dockerd only while docker.service is active (a
        request to docker.socket while docker is down would start it)."""
        if self.unit("docker", "ActiveState")["ActiveState"] != "active":
            return "docker-down"
        shown = self.box.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                             check=False, timeout=30)
        return shown.stdout.strip() if shown.returncode == 0 else "unreachable"

    def wait_swarm(self, state: str, timeout: float = 90) -> float:
        """Wait for the swarm state; returns the host's monotonic clock when it was seen."""
        deadline = time.monotonic() + timeout
        while (seen := self.swarm_state()) != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"swarm is {seen!r}, not {state!r}, after {timeout} s\n"
                                     f"{self.journal_text('unseal-agent')[-4000:]}")
            time.sleep(0.05)
        return time.monotonic()

    def docker_active_since(self) -> float:
        """When docker.service last became active, on the monotonic clock the host shares."""
        shown = self.unit("docker", "ActiveEnterTimestampMonotonic")
        return int(shown["ActiveEnterTimestampMonotonic"]) / 1e6

    def journal(self, unit: str) -> list[dict[str, object]]:
        shown = self.box.run(["journalctl", "-u", unit, "-o", "json", "--no-pager"])
        return [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]

    def journal_text(self, unit: str) -> str:
        return self.box.run(["journalctl", "-u", unit, "--no-pager", "-o", "short-monotonic"],
                            check=False).stdout

    def agent_messages(self) -> list[str]:
        return self.box.run(["journalctl", "-u", "unseal-agent", "-o", "cat", "--no-pager"]
                            ).stdout.splitlines()

    def unlocks(self) -> int:
        """How many times the agent has unlocked this manager (its journal says so each time)."""
        return sum(m.startswith("unlocked the manager") for m in self.agent_messages())

    def file(self, path: str) -> Path:
        """A file inside the box, seen from the host."""
        return Path(f"/proc/{self.box.pid1}/root{path}")

    def remember_unlock_key(self) -> None:
        self.unlock_keys.add(self.box.run(["docker", "swarm", "unlock-key", "-q"]).stdout.strip())


def _custodian_env(name: str) -> dict[str, str]:
    """What custodian `name`'s terminal sets, as README says: the escrow on this host."""
    return {"ESCROW_URL": "https://127.0.0.1:8443", "ESCROW_CA": "/var/lib/escrow/tls/ca.pem",
            "ESCROW_KEY": f"{CUSTODIANS}/{name}.key"}


def build_wheels(out: Path) -> Path:
    """The project's wheels and its dependencies', built as README says."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True)
    return out


def binds(wheels: Path) -> dict[Path, str]:
    """What a box needs from the host for `install`."""
    return {wheels: "/root/wheels"}


# Tests and benchmarks unlock one node far more often than the default of 10 unseal requests
# per node per 600 s that protects a real escrow.
ESCROW_DROP_IN = "[Service]\nEnvironment=ESCROW_REQUESTS_RATE_LIMIT=1000\n"
ROOT_CA = "/srv/swarm-root-ca.crt"


def install(site: Site) -> None:
    """README's "Install with systemd", then a registered swarm and an enrolled agent, all on
    one host."""
    install_escrow(site)
    site.sh(f"""
        docker swarm init --autolock --advertise-addr 127.0.0.1 >/dev/null
        install -m 0644 /var/lib/docker/swarm/certificates/swarm-root-ca.crt {ROOT_CA}
    """)
    register_cluster(site, site)
    install_agent(site, AGENT_CONFIG, site.file("/var/lib/escrow/tls/ca.pem").read_bytes())


def install_escrow(site: Site, drop_in: str = ESCROW_DROP_IN) -> None:
    """README's venv and escrow blocks, the test's drop-in, and custodians alice and bob."""
    venv, escrow, _ = readme_blocks("Install with systemd")
    for line in venv + escrow:
        site.sh(line)
    site.sh(f"""
        install -d /etc/systemd/system/escrow.service.d
        printf '{drop_in}' > /etc/systemd/system/escrow.service.d/lab.conf
        systemctl daemon-reload && systemctl restart escrow
    """)
    site.sh(f"""
        install -d -m 0755 {CUSTODIANS}
        printf '%s\\n' '{PASSPHRASE}' > {CUSTODIANS}/passphrase
        for name in alice bob; do
          {ESCROW} custodian keygen --out {CUSTODIANS}/$name.key \
            --passphrase-file {CUSTODIANS}/passphrase >/dev/null
        done
        chmod 0644 {CUSTODIANS}/*.pub
    """)
    for name in ("alice", "bob"):
        site.escrow_admin("custodian", "add", name, "--public-key", f"{CUSTODIANS}/{name}.key.pub")


def register_cluster(escrow: Site, manager: Site) -> None:
    """The manager's swarm registered on the escrow (2 of auto, auto, alice, bob), its root CA
    carried over as an operator copies a file."""
    if escrow is not manager:
        escrow.file(ROOT_CA).write_bytes(
            manager.file("/var/lib/docker/swarm/certificates/swarm-root-ca.crt").read_bytes())
        escrow.file(ROOT_CA).chmod(0o644)
    manager.cluster_id = manager.box.run(
        ["docker", "info", "--format", "{{.Swarm.Cluster.ID}}"]).stdout.strip()
    escrow.cluster_id = manager.cluster_id
    escrow.escrow_admin("cluster", "add", manager.cluster_id, "--root-ca", ROOT_CA,
                        "--threshold", "2", "--slots", "auto,auto,alice,bob")
    manager.remember_unlock_key()


def install_agent(site: Site, config: str, escrow_ca: bytes) -> None:
    """README's agent block, with config.toml and escrow-ca.pem written where it says."""
    if site.box.run(["test", "-x", AGENT], check=False).returncode != 0:
        venv, _, _ = readme_blocks("Install with systemd")
        for line in venv:
            site.sh(line)
    _, _, agent = readme_blocks("Install with systemd")
    # README leaves writing config.toml and escrow-ca.pem to the operator, after this line.
    makes_config_dir = "install -d -m 0755 /etc/unseal-agent"
    assert agent[1].startswith(makes_config_dir), agent
    for line in agent:
        site.sh(line)
        if line.startswith(makes_config_dir):
            site.file("/etc/unseal-agent/config.toml").write_text(config)
            site.file("/etc/unseal-agent/escrow-ca.pem").write_bytes(escrow_ca)
            site.sh("chmod 0600 /etc/unseal-agent/config.toml && "
                    "chmod 0644 /etc/unseal-agent/escrow-ca.pem")
