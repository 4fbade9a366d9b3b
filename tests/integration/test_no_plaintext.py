"""After a deposit, no file anywhere in the data directory or the token holds key material."""

from __future__ import annotations

import base64
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from escrow.core import shares
from escrow.core.unlockkey import UnlockKey
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault
from escrow.wrapping import Token
from lab.commands import run_escrow
from lab.custodians import public_key_pem
from tests.conftest import SoftHsm

CLUSTER = "n" * 25


def needles(key: UnlockKey, mnemonics: list[str]) -> dict[str, bytes]:
    found = {
        "unlock key": key.swmkey().encode(),
        "base64 body": key.swmkey()[9:].encode(),
        "padded base64": base64.b64encode(key.kek),
        "urlsafe base64": base64.urlsafe_b64encode(key.kek).rstrip(b"="),
        "raw KEK": key.kek,
        "hex KEK": key.kek.hex().encode(),
    }
    for number, mnemonic in enumerate(mnemonics):
        words = mnemonic.split()
        found[f"mnemonic {number}"] = mnemonic.encode()
        # Any four consecutive words of the share's value, with any separator.
        for start in range(4, len(words) - 4):
            window = words[start:start + 4]
            found[f"mnemonic {number} words {start}"] = " ".join(window).encode()
            found[f"mnemonic {number} words {start} joined"] = "".join(window).encode()
    return found


def scan(roots: list[Path], secrets: dict[str, bytes]) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits += [f"{what} in {path}" for what, needle in secrets.items()
                         if needle in data]
    return hits


@pytest.mark.slow
def test_deposit_leaves_no_key_or_share_in_any_file_output_or_log(
        data_dir: Path, softhsm: SoftHsm, token: Token, root_ca_pem: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    (data_dir / "ca.pem").write_bytes(root_ca_pem)
    pub = data_dir / "alice.pub"
    pub.write_bytes(public_key_pem())
    steps = [
        run_escrow("custodian", "add", "alice", "--public-key", str(pub), data_dir=data_dir),
        run_escrow("cluster", "add", CLUSTER, "--root-ca", str(data_dir / "ca.pem"),
                   "--threshold", "1", "--slots", "auto,alice", data_dir=data_dir),
    ]
    key = UnlockKey(os.urandom(32))
    steps.append(run_escrow("deposit", "--cluster", CLUSTER, data_dir=data_dir,
                            stdin=key.swmkey() + "\n"))
    steps.append(run_escrow("key", "list", "--cluster", CLUSTER, "--json", data_dir=data_dir))
    steps.append(run_escrow("audit", "show", "--json", data_dir=data_dir))
    for step in steps:
        assert step.returncode == 0, step.stderr

    store = SqliteStore.open(data_dir / "escrow.db", lambda: "t")
    vault = Vault(store, token, lambda: datetime.now(UTC), "test")
    mnemonics = [vault.unwrap_share(s) for s in store.get_shares(CLUSTER, 1)]
    store.close()
    assert shares.combine(mnemonics[:1]) == key  # the needles are the real thing

    secrets = needles(key, mnemonics)
    control = data_dir.parent / "control"
    control.mkdir()
    (control / "leak").write_bytes(b"..." + secrets["mnemonic 1 words 7"] + b"...")
    assert f"mnemonic 1 words 7 in {control / 'leak'}" in scan([control], secrets)
    assert scan([data_dir, softhsm.directory], secrets) == []
    output = "".join(s.stdout + s.stderr for s in steps) + caplog.text
    assert [what for what, needle in secrets.items() if needle.decode("latin-1") in output] == []
