"""`escrow backup` and `escrow restore` with a swarm: a host rebuilt from a backup unseals a
real manager (the rest is tests/integration/test_backup.py)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from lab.agent import enrolled_manager
from lab.dockerd import Dockerd
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow


def test_an_escrow_rebuilt_from_a_backup_and_its_token_unseals_the_manager(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob")
    backup = tmp_path / "escrow.backup"
    made = escrow.cli("backup", "--out", str(backup))  # while the server runs
    assert made.returncode == 0, made.stderr
    assert backup.stat().st_mode & 0o777 == 0o600
    with tarfile.open(backup) as tar:
        names = set(tar.getnames())
    # Shares stay wrapped: neither the token nor its PIN travel with the backup.
    assert {"MANIFEST.json", "escrow.db", "escrow.toml", "tls/ca.pem"} <= names
    assert not any(n.startswith("softhsm") or n == "hsm-pin" for n in names)
    assert "tls/server.key" not in names
    old_ca = escrow.ca.read_bytes()
    # The operator backs the token up apart from the escrow's backup.
    tokens = tmp_path / "token-backup"
    shutil.copytree(escrow.data_dir / "softhsm", tokens / "softhsm")
    shutil.copy2(escrow.data_dir / "hsm-pin", tokens / "hsm-pin")
    escrow.stop()
    shutil.rmtree(escrow.data_dir)  # the escrow host is lost

    restored = escrow.cli("restore", "--from", str(backup))
    assert restored.returncode == 0, restored.stderr
    # The TLS key was left out, and restore says what to do: the quickstart CA's key was never
    # kept, so the rebuilt escrow gets a new CA and server certificate, and the agents get the
    # new ca.pem (here the node's escrow_ca is that very file).
    assert "the TLS private key was not in the backup" in restored.stderr
    tls = escrow.data_dir / "tls"
    assert f"mv {tls} {tls}.from-backup && escrow init --data-dir {escrow.data_dir} " \
        "--exist-ok" in " ".join(restored.stderr.split())
    tls.rename(tls.parent / "tls.from-backup")
    reissued = escrow.cli("init", "--exist-ok")
    assert reissued.returncode == 0, reissued.stderr
    assert (tls / "server.key").exists()
    assert escrow.ca.read_bytes() != old_ca
    shutil.copytree(tokens / "softhsm", escrow.data_dir / "softhsm")
    shutil.copy2(tokens / "hsm-pin", escrow.data_dir / "hsm-pin")
    assert escrow.cli("audit", "verify").returncode == 0
    events = [event for event, _ in escrow.audit("escrow.")]
    assert events[-2:] == ["escrow.backup", "escrow.restore"]
    escrow.start()

    notify = node.start()
    try:
        notify.wait_for(lambda line: line.startswith("STATUS=unlocked"))
        dockerd.restart()
        node.wait_state("active")
    finally:
        assert node.stop() == 0
    assert "unlocked the manager with key version 1" in node.log()
    # The restored escrow kept its deposit key (wrapped in the database): the agent's pin
    # holds, and a rotation is escrowed there.
    rotated = node.command("rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "the escrow holds the new key as version 2" in rotated.stdout

