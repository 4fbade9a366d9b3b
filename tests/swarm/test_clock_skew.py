"""Drill: the agent's clock is minutes off the escrow's (libfaketime in the agent's process).

Within the tolerances (certificates are backdated an hour; custodian signatures allow five
minutes) unsealing works; beyond them every refusal names the clocks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lab import faketime
from lab.agent import enrolled_manager
from lab.commands import run_escrow
from lab.dockerd import Dockerd
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("offset", ["-10m", "+10m"])
def test_an_agent_whose_clock_is_minutes_off_still_unseals_and_reports_the_offset(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path, offset: str) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob",
                            env=faketime.moved(offset))
    shown = node.command("status")
    sign = "+" if offset.startswith("-") else "-"  # the escrow's clock relative to the agent's
    assert re.search(rf"escrow \{sign}(599|600|601) s from this host", shown.stdout), shown.stdout
    assert "the escrow's clock is" in shown.stdout + shown.stderr
    notify = node.start()
    try:
        notify.wait_for(lambda line: line.startswith("STATUS=unlocked"))
        dockerd.restart()
        node.wait_state("active", timeout=60)
    finally:
        stopped = node.stop()
        # None: it did not stop within 60 s of SIGTERM (seen once in CI); its log says where.
        assert stopped == 0, node.log()[-4000:]
    assert "unlocked the manager with key version 1" in node.log()


def test_clocks_off_beyond_the_tolerances_are_refused_with_a_message_naming_the_clocks(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob")
    node.env.update(faketime.moved("-3h"))
    shown = node.command("status")
    assert shown.returncode == 1
    assert (f"the TLS certificate of the escrow at {escrow.url} is not valid yet by this "
            "host's clock"
            in shown.stdout + shown.stderr), shown.stdout + shown.stderr

    # A custodian whose clock is ten minutes fast is told so by the escrow.
    listed = run_escrow("requests", "--url", escrow.url, "--ca", str(escrow.ca),
                        "--key", str(escrow.base / "alice"),
                        "--passphrase-file", str(escrow.base / "pass"),
                        env={**faketime.moved("+10m"), "ESCROW_DATA_DIR": os.devnull})
    assert listed.returncode == 1
    assert re.search(r"your clock is (599|600|601) s off the escrow's", listed.stderr)
    assert "synchronise it (NTP)" in listed.stderr
