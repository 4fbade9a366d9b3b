"""`escrow backup` and `escrow restore`: a host rebuilt from a backup unseals a real manager."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.helpers.agent import enrolled_manager
from tests.helpers.dockerd import Dockerd
from tests.helpers.server import EscrowProcess

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
    # The operator backs the token up apart from the escrow's backup.
    tokens = tmp_path / "token-backup"
    shutil.copytree(escrow.data_dir / "softhsm", tokens / "softhsm")
    shutil.copy2(escrow.data_dir / "hsm-pin", tokens / "hsm-pin")
    escrow.stop()
    shutil.rmtree(escrow.data_dir)  # the escrow host is lost

    restored = escrow.cli("restore", "--from", str(backup))
    assert restored.returncode == 0, restored.stderr
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


def test_restore_refuses_an_altered_backup_or_an_existing_escrow_and_writes_nothing(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    backup = tmp_path / "escrow.backup"
    assert escrow.cli("backup", "--out", str(backup)).returncode == 0
    again = escrow.cli("backup", "--out", str(backup))
    assert again.returncode == 1
    assert "already exists" in again.stderr

    onto_existing = escrow.cli("restore", "--from", str(backup))
    assert onto_existing.returncode == 1
    assert "already holds an escrow" in onto_existing.stderr

    altered = tmp_path / "altered.backup"
    with tarfile.open(backup) as source, tarfile.open(altered, "w:gz") as target:
        for member in source.getmembers():
            content = source.extractfile(member)
            assert content is not None
            data = content.read()
            if member.name == "escrow.toml":
                data += b"\n# edited\n"
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    fresh = tmp_path / "fresh"
    refused = escrow.cli("restore", "--from", str(altered), "--data-dir", str(fresh))
    assert refused.returncode == 1
    assert "escrow.toml" in refused.stderr
    assert "does not match its SHA-256" in refused.stderr
    assert not fresh.exists() or list(fresh.iterdir()) == []
