"""Agents on three real managers in network namespaces: a restarted manager is unlocked and
rejoins; a manager that was down during a rotation is unlocked with the older key version and
then catches up (issue 4, scenarios 2 and 3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.swarm_identity import CERT_DIR, decrypt_node_key
from escrow.core import unlockkey
from lab.agent import AgentNode
from lab.dockerd import Dockerd
from lab.netlab import ready_managers, wait_for
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow



@pytest.fixture
def agents(three_managers: list[Dockerd], escrow: EscrowProcess,
           tmp_path: Path) -> Iterator[list[AgentNode]]:
    """An enrolled, running agent on each of the three managers."""
    first = three_managers[0]
    cluster_id = first.api().info()["Swarm"]["Cluster"]["ID"]
    added = escrow.cli("cluster", "add", cluster_id, "--root-ca",
                       str(first.data_root / CERT_DIR / "swarm-root-ca.crt"), "--threshold",
                       "2", "--slots", "auto,auto,alice,bob")
    assert added.returncode == 0, added.stderr
    nodes = [AgentNode(tmp_path / str(daemon.hostname), daemon, escrow)
             for daemon in three_managers]
    try:
        for node in nodes:
            node.enroll()
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            assert "Traceback" not in node.log()


def test_a_restarted_manager_is_unlocked_by_its_agent_and_rejoins(
        agents: list[AgentNode]) -> None:
    first, second, _ = agents
    second.daemon.restart()
    seconds = second.wait_state("active")
    rejoined = wait_for(lambda: ready_managers(first.daemon) == {
        a.daemon.hostname for a in agents}, 60, "all three managers ready and reachable")
    print(f"\nlocked -> active: {seconds:.2f} s, then reachable after {rejoined:.2f} s")
    assert "unlocked the manager with key version 1" in second.log()


def test_a_manager_down_during_a_rotation_is_unlocked_with_the_older_version_then_catches_up(
        agents: list[AgentNode], escrow: EscrowProcess) -> None:
    first, _, third = agents
    cluster_id = first.daemon.api().info()["Swarm"]["Cluster"]["ID"]
    third.daemon.stop()
    rotated = first.command("rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_key = unlockkey.parse(first.daemon.api().get_unlock_key()["UnlockKey"])
    listed = json.loads(escrow.cli("key", "list", "--cluster", cluster_id, "--json").stdout)
    assert [v["version"] for v in listed] == [2, 1]

    third.daemon.start()
    seconds = third.wait_state("active")
    log = third.log()
    assert "key version 2 does not unlock this manager" in log
    assert "unlocked the manager with key version 1" in log
    results = [(d["outcome"], d["version"]) for _, d in escrow.audit("unseal.result")]
    assert results[-2:] == [("invalid_key", 2), ("unlocked", 1)]

    def caught_up() -> bool:
        key_pem = (third.daemon.data_root / CERT_DIR / "swarm-node.key").read_bytes()
        try:
            decrypt_node_key(key_pem, new_key)
        except AgentError:
            return False
        return True

    behind = wait_for(caught_up, 60, "the restarted manager's key re-encrypted under v2")
    wait_for(lambda: ready_managers(first.daemon) == {a.daemon.hostname for a in agents}, 60,
             "all three managers ready and reachable")
    print(f"\nlocked -> active with v1: {seconds:.2f} s; on v2 {behind:.2f} s later")
    # The escrow still holds exactly the two versions: catching up deposited nothing new.
    listed = json.loads(escrow.cli("key", "list", "--cluster", cluster_id, "--json").stdout)
    assert [v["version"] for v in listed] == [2, 1]
    assert all(a.process is not None and a.process.poll() is None for a in agents)
