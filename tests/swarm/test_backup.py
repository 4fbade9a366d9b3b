"""`escrow backup` and `escrow restore`: a host rebuilt from a backup unseals a real manager;
a backup holds no private key."""

from __future__ import annotations

import hashlib
import io
import json
import re
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
    # The restored escrow kept its deposit key (sealed in the database): the agent's pin
    # holds, and a rotation is escrowed there.
    rotated = node.command("rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "the escrow holds the new key as version 2" in rotated.stdout


PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def test_a_stolen_backup_holds_no_tls_private_key(escrow: EscrowProcess, tmp_path: Path) -> None:
    """Whoever steals a backup gets no key to pass for the escrow with: not the server's
    TLS key, nor any other private key an operator left in tls/."""
    tls = escrow.data_dir / "tls"
    assert PEM_PRIVATE_KEY.search((tls / "server.key").read_bytes())
    (tls / "old-server.pem").write_bytes((tls / "server.key").read_bytes())  # a key by content
    (tls / "ca.key").write_bytes(b"a CA key in some other encoding\n")  # a key by its name
    backup = tmp_path / "stolen.backup"
    made = escrow.cli("backup", "--out", str(backup))
    assert made.returncode == 0, made.stderr
    assert "left out: tls/ca.key, tls/old-server.pem, tls/server.key, the token and its " \
        "PIN" in " ".join(made.stderr.split())
    with tarfile.open(backup) as tar:
        contents = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers()}
    assert {"tls/ca.pem", "tls/server.pem"} <= set(contents)
    assert not {"tls/server.key", "tls/ca.key", "tls/old-server.pem"} & set(contents)
    # The database included: it holds shares and the deposit key sealed by the token only.
    for name, content in contents.items():
        assert b"PRIVATE KEY" not in content, name


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


def test_restoring_an_old_backup_that_holds_the_tls_key_warns(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    """A backup made before backups left the TLS key out: restore warns that whoever has a
    copy of it can pass for the escrow."""
    backup = tmp_path / "new.backup"
    assert escrow.cli("backup", "--out", str(backup)).returncode == 0
    key = (escrow.data_dir / "tls" / "server.key").read_bytes()
    old = tmp_path / "old.backup"
    with tarfile.open(backup) as source, tarfile.open(old, "w:gz") as target:
        contents = {m.name: source.extractfile(m).read()  # type: ignore[union-attr]
                    for m in source.getmembers()}
        manifest = json.loads(contents.pop("MANIFEST.json"))
        contents["tls/server.key"] = key
        manifest["files"]["tls/server.key"] = hashlib.sha256(key).hexdigest()
        for name, data in [("MANIFEST.json", json.dumps(manifest).encode()),
                           *contents.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    restored = escrow.cli("restore", "--from", str(old), "--data-dir", str(tmp_path / "r"))
    assert restored.returncode == 0, restored.stderr
    assert "warning: this backup holds a TLS private key (tls/server.key; made before " \
        "backups left it out)" in " ".join(restored.stderr.split())
    assert "was not in the backup" not in restored.stderr
