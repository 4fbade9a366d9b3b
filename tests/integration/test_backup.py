"""`escrow backup` and `escrow restore` without a swarm: a backup holds no private key, and
restore refuses what it must not take."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from lab.server import EscrowProcess

pytestmark = pytest.mark.slow

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
    # The database included: it holds shares and the deposit key wrapped by the token only.
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
