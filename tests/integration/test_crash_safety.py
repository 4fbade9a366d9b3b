"""A process killed with SIGKILL at any instant of a deposit leaves the whole version or none."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from escrow import audit
from escrow.core import shares
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault
from escrow.wrapping import Token
from lab.commands import REPO

CLUSTER = "q" * 25
ROUNDS = 40


def run_and_kill(data_dir: Path, rng: random.Random) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    child = subprocess.Popen(
        [sys.executable, "-m", "lab.deposit_loop", str(data_dir), CLUSTER],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        output, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return [line for line in output.splitlines() if len(line) == 64]


@pytest.mark.slow
def test_sigkill_during_deposits_never_leaves_a_partial_version(
        data_dir: Path, token: Token, root_ca_pem: bytes) -> None:
    store = SqliteStore.open(data_dir / "escrow.db", lambda: "t")
    vault = Vault(store, token, __import__("datetime").datetime.now, "test")
    vault.add_cluster(CLUSTER, root_ca_pem, 3, ["auto"] * 5, allow_no_paper=True)

    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    acknowledged: list[str] = []
    for _ in range(ROUNDS):
        acknowledged += run_and_kill(data_dir, rng)

    versions = store.list_key_versions(CLUSTER)
    stored = {v.fingerprint: v for v in versions}
    assert set(acknowledged) <= set(stored), "an acknowledged deposit was lost"
    assert len(versions) >= len(acknowledged) >= ROUNDS // 2
    for version in versions:
        rows = store.get_shares(CLUSTER, version.version)
        assert [r.slot for r in rows] == [0, 1, 2, 3, 4], f"version {version.version} is partial"
        mnemonics = [vault.unwrap_share(r) for r in rows]
        assert shares.combine(mnemonics[1:4]).fingerprint(CLUSTER) == version.fingerprint
    records = list(store.iter_audit())
    assert audit.verify(records) == []
    deposits = [r for r in records if r.event == "key.deposit"]
    assert sorted(r.details["version"] for r in deposits) == sorted(v.version for v in versions)
    store.close()
