"""`escrow hsm rewrap` and `escrow hsm destroy-key`: rotating the HSM wrapping key
(docs/runbooks/rotate-wrapping-key.md), on a real SoftHSM token and a real `escrow serve`."""

from __future__ import annotations

import os
import sqlite3
import tomllib
from pathlib import Path

import pytest

from escrow.core.unlockkey import UnlockKey
from lab.api import deposit, enrolled, run, unseal
from lab.server import EscrowProcess, make_escrow

pytestmark = pytest.mark.slow
OLD, NEW = "escrow-wrap", "escrow-wrap-2"


def wrapped(escrow: EscrowProcess) -> dict[tuple[str, int, int], bytes]:
    with sqlite3.connect(escrow.data_dir / "escrow.db") as db:
        rows = db.execute("SELECT cluster_id, version, slot, wrapped FROM shares").fetchall()
        rows += db.execute("SELECT name, 0, 0, value FROM meta").fetchall()
    return {(r[0], r[1], r[2]): bytes(r[3]) for r in rows}


def set_share(escrow: EscrowProcess, row: tuple[str, int, int], value: bytes) -> None:
    with sqlite3.connect(escrow.data_dir / "escrow.db") as db:
        db.execute("UPDATE shares SET wrapped = ? WHERE cluster_id = ? AND version = ? "
                   "AND slot = ?", (value, *row))


def key_label(escrow: EscrowProcess) -> str:
    return str(tomllib.loads((escrow.data_dir / "escrow.toml").read_text())["hsm"]["key_label"])


@pytest.fixture
def escrow(tmp_path: Path) -> EscrowProcess:
    escrow = make_escrow(tmp_path / "escrow")
    escrow.custodian("alice")
    escrow.custodian("bob")
    return escrow


def test_rewrap_moves_every_share_to_a_new_key_and_the_old_key_can_then_be_destroyed(
        escrow: EscrowProcess) -> None:
    escrow.start()
    _, node, first = enrolled(escrow)
    second = UnlockKey(os.urandom(32))
    assert run(deposit(escrow, node, second)) == 2
    busy = escrow.cli("hsm", "rewrap", "--to-label", NEW)
    assert busy.returncode == 1
    assert "is in use by escrow serve (pid" in busy.stderr
    assert "systemctl stop escrow" in busy.stderr
    escrow.stop()

    before = wrapped(escrow)
    done = escrow.cli("hsm", "rewrap", "--to-label", NEW)
    assert done.returncode == 0, done.stderr
    assert f"re-wrapped 8 share(s) and the deposit key from '{OLD}' to '{NEW}'" in done.stdout
    after = wrapped(escrow)
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in before)
    assert key_label(escrow) == NEW
    assert escrow.cli("audit", "verify").returncode == 0
    [(event, details)] = escrow.audit("hsm.")
    assert (event, details["from_label"], details["to_label"], details["shares"]) == (
        "hsm.rewrap", OLD, NEW, 8)

    escrow.start()
    assert run(unseal(escrow, node)) == [(2, second), (1, first)]
    escrow.stop()

    in_use = escrow.cli("hsm", "destroy-key", NEW, "--yes")
    assert in_use.returncode == 1
    assert "is the wrapping key the escrow uses now" in in_use.stderr
    destroyed = escrow.cli("hsm", "destroy-key", OLD, "--yes")
    assert destroyed.returncode == 0, destroyed.stderr
    again = escrow.cli("hsm", "destroy-key", OLD, "--yes")
    assert again.returncode == 1
    assert f"has no wrapping key labelled '{OLD}'" in again.stderr
    assert [event for event, _ in escrow.audit("hsm.")] == ["hsm.rewrap", "hsm.destroy_key"]

    escrow.start()  # a fresh login finds every share under the new key alone
    assert run(unseal(escrow, node)) == [(2, second), (1, first)]
    escrow.stop()


def test_a_rewrap_that_fails_changes_nothing_and_one_cut_short_is_finished_by_running_again(
        escrow: EscrowProcess) -> None:
    escrow.start()
    _, node, key = enrolled(escrow)
    escrow.stop()
    pristine = wrapped(escrow)

    # One altered share row: the whole rewrap is refused, no share and no config changed.
    row = (node.cluster_id, 1, 3)
    set_share(escrow, row, pristine[row][:-1] + bytes([pristine[row][-1] ^ 1]))
    damaged = wrapped(escrow)
    refused = escrow.cli("hsm", "rewrap", "--to-label", NEW)
    assert refused.returncode == 1
    assert "failed authentication" in refused.stderr
    assert wrapped(escrow) == damaged
    assert key_label(escrow) == OLD
    set_share(escrow, row, pristine[row])

    # The database was re-wrapped but the config kept the old label (a crash in between).
    config = escrow.data_dir / "escrow.toml"
    old_config = config.read_text()
    assert escrow.cli("hsm", "rewrap", "--to-label", NEW).returncode == 0
    config.write_text(old_config)
    escrow.start(healthy=False)
    status, body = escrow.health()
    assert status == 503
    assert f"wrapped with a wrapping key other than '{OLD}'" in body["message"]
    escrow.stop()

    finished = escrow.cli("hsm", "rewrap", "--to-label", NEW)
    assert finished.returncode == 0, finished.stderr
    assert key_label(escrow) == NEW
    escrow.start()
    assert run(unseal(escrow, node)) == [(1, key)]
    escrow.stop()
    assert escrow.cli("audit", "verify").returncode == 0
