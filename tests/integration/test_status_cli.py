"""`escrow status` against a real escrow, from a viewer's token: the same view as the page,
exit 0 when no manager is locked, 2 when one is, 1 on any error, and --watch redrawing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.api import enrolled, waiting_manager
from lab.commands import REPO, run_escrow
from lab.server import EscrowProcess
from tests.conftest import fails


def token_file(escrow: EscrowProcess, tmp_path: Path) -> Path:
    path = tmp_path / "viewer.token"
    path.write_text(escrow.viewer("oncall") + "\n")
    path.chmod(0o600)
    return path


def status(escrow: EscrowProcess, token: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_escrow("status", "--url", escrow.url, "--ca", str(escrow.ca), "--token-file",
                      str(token), *args)


def test_a_locked_manager_waiting_for_custodians_is_shown_and_exits_2(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    request_id, _ = waiting_manager(escrow, kek_version="[bold red]x[/]")
    token = token_file(escrow, tmp_path)
    shown = status(escrow, token)
    assert shown.returncode == 2, shown.stderr
    out = shown.stdout
    print(out)
    for text in ("1 manager(s) locked: manager-2", "LOCKED, waiting for custodians",
                 request_id, "1 more of 3", "alice", "bob", "HSM", "up", "sqlite, writable",
                 "[bold red]x[/]"):  # markup a node sent, shown as the text it is
        assert text in out, text
    as_json = status(escrow, token, "--json")
    assert as_json.returncode == 2
    fleet = json.loads(as_json.stdout)
    assert {n["state"] for c in fleet["clusters"] for n in c["nodes"]} == {"unlocked",
                                                                           "waiting"}


def test_every_manager_unlocked_exits_0(escrow: EscrowProcess, tmp_path: Path) -> None:
    enrolled(escrow)  # enrolled, never beat, never locked: unreachable, not locked
    shown = status(escrow, token_file(escrow, tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert "unreachable" in shown.stdout


def test_errors_exit_1_and_say_what_to_do(escrow: EscrowProcess, tmp_path: Path) -> None:
    token = token_file(escrow, tmp_path)
    wrong = tmp_path / "wrong.token"
    wrong.write_text("esv_" + "x" * 43 + "\n")
    wrong.chmod(0o600)
    fails(status(escrow, wrong), 1, "no viewer holds this token", "escrow viewer add")
    token.chmod(0o644)
    fails(status(escrow, token), 1, "readable or writable by every user", "chmod 600")
    fails(run_escrow("status", "--url", escrow.url, "--ca", str(escrow.ca)), 1,
          "--token-file")
    token.chmod(0o600)
    fails(status(escrow, token, "--watch", "--json"), 1, "--watch")
    escrow.stop()
    fails(status(escrow, token), 1, f"the escrow at {escrow.url} is unreachable: ")


def test_watch_redraws_until_interrupted(escrow: EscrowProcess, tmp_path: Path) -> None:
    enrolled(escrow)
    token = token_file(escrow, tmp_path)
    watching = subprocess.Popen(
        [sys.executable, "-m", "escrow", "status", "--url", escrow.url, "--ca", str(escrow.ca),
         "--token-file", str(token), "--watch", "--interval", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    try:
        time.sleep(3.5)  # the first view and a few redraws
    finally:
        watching.send_signal(signal.SIGINT)
        out, err = watching.communicate(timeout=20)
    assert watching.returncode == 0, err
    assert out.count("Escrow (as of") >= 2, out
