"""Replicas on PostgreSQL with a real autolocked manager: a custodian approves through one
replica while the manager's agent long-polls the other (issue 16's third drill)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from lab.agent import enrolled_manager
from lab.dockerd import Dockerd
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow


def test_an_approval_through_one_replica_reaches_a_manager_polling_the_other_within_a_second(
        dockerd: Dockerd, replicas: list[EscrowProcess], tmp_path: Path) -> None:
    first, second = replicas
    node = enrolled_manager(dockerd, second, tmp_path / "node", "auto,alice,bob")
    notify = node.start()
    try:
        dockerd.restart()
        request_id = notify.waiting_for_approval()
        time.sleep(1.0)  # the agent's long poll is waiting at the second replica
        approved = first.as_custodian("bob", "approve", request_id, "--yes")
        assert approved.returncode == 0, approved.stderr
        when, _ = notify.wait_for(lambda line: line.startswith("STATUS=unlocked at"))
        unlocked = time.time() - (time.monotonic() - when)
        dockerd.wait_state("active")
    finally:
        node.stop()
    # The escrow's part, from the approval's commit through replica A to the shares released
    # to the long poll waiting at replica B (the two audit records' times); then the agent's
    # and dockerd's, to the unlock call done (dockerd alone sometimes takes a second here).
    times = {(r["event"], r["details"].get("request_id")): datetime.fromisoformat(
        r["time"]).timestamp() for r in json.loads(
        first.cli("audit", "show", "--json", "--limit", "50").stdout)}
    decided = times["custodian.approve", request_id]
    released = times["unseal.release", request_id]
    print(f"\napproval through one replica -> shares released to the poll at the other: "
          f"{released - decided:.3f} s; -> manager unlocked: {unlocked - decided:.3f} s")
    assert released - decided < 1.0
    assert ("unseal.result", {"request_id": request_id, "outcome": "unlocked",
                              "version": 1}) in first.audit("unseal")
