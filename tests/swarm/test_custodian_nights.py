"""Custodians' nights on three real autolocked managers, each with its running agent, and a
policy of custodians alone (2 of alice, bob, carol: no automatic slot): a manager unlocks
only when two different custodians approve; after a power cut one command per custodian
approves every manager; on a patch night a window signed the day before approves the named
managers' restarts and no one else's; a cluster with a deny window unlocks by itself after
the delay."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.swarm_identity import CERT_DIR
from lab import faketime
from lab.agent import AgentNode
from lab.netlab import NetLab, ready_managers, wait_for
from lab.server import EscrowProcess, make_escrow
from tests.conftest import fails, ok

pytestmark = pytest.mark.slow


@dataclass
class Night:
    escrow: EscrowProcess
    agents: list[AgentNode]
    cluster_id: str
    clock: Path  # the escrow's clock offset, in seconds (libfaketime)

    def all_ready(self) -> float:
        first = self.agents[0].daemon
        return wait_for(lambda: ready_managers(first) == {
            a.daemon.hostname for a in self.agents}, 90, "all three managers ready")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Night]:
    base = tmp_path_factory.mktemp("night")
    with NetLab(nodes=3) as lab:
        managers = lab.managers(3)
        clock = base / "clock"
        escrow = make_escrow(base / "escrow", **faketime.following(clock))
        for name in ("alice", "bob", "carol"):
            escrow.custodian(name)
        escrow.start()
        agents: list[AgentNode] = []
        try:
            cluster_id = managers[0].api().info()["Swarm"]["Cluster"]["ID"]
            ok(escrow.cli("cluster", "add", cluster_id, "--root-ca",
                          str(managers[0].data_root / CERT_DIR / "swarm-root-ca.crt"),
                          "--threshold", "2", "--slots", "alice,bob,carol"))
            # Long polls of 5 s: the escrow's clock moved ahead wakes no poll by itself.
            agents = [AgentNode(base / str(daemon.hostname), daemon, escrow,
                                {"approval_wait_seconds": 5.0}) for daemon in managers]
            for agent in agents:
                agent.enroll()
                agent.start()
            yield Night(escrow, agents, cluster_id, clock)
        finally:
            for agent in agents:
                agent.stop()
            escrow.stop()
        for agent in agents:
            assert "Traceback" not in agent.log()


def waiting(agent: AgentNode, approvals: int, after: float) -> str:
    """The id of the request ``agent`` says (after ``after``) waits for ``approvals`` more."""
    assert agent.notify is not None
    wanted = f"STATUS=locked, waiting for {approvals} more approval"
    _, line = agent.notify.wait_for(lambda line: line.startswith(wanted), 90, after)
    return line.split("(request ")[1].split(",")[0]


def local_state(agent: AgentNode) -> str:
    return str(agent.daemon.api().info()["Swarm"]["LocalNodeState"])


def test_a_custodians_only_policy_unlocks_after_two_different_custodians_not_one_twice(
        night: Night) -> None:
    escrow, second = night.escrow, night.agents[1]
    after = time.monotonic()
    second.daemon.restart()
    request_id = waiting(second, 2, after)
    ok(escrow.as_custodian("alice", "approve", request_id, "--yes"))
    waiting(second, 1, after)
    fails(escrow.as_custodian("alice", "approve", request_id, "--yes"), 1, "already decided")
    time.sleep(3)  # a poll or two: one custodian's approval, however often, is not a quorum
    assert local_state(second) == "locked"
    ok(escrow.as_custodian("bob", "approve", request_id, "--yes"))
    seconds = second.wait_state("active")
    print(f"\nsecond approval -> active: {seconds:.2f} s")
    decided = [(e, d.get("reason", "")) for e, d in escrow.audit("custodian.")
               if d.get("request_id") == request_id]
    assert decided == [("custodian.approve", ""), ("custodian.approve.refused",
                                                   "already_decided"), ("custodian.approve", "")]
    night.all_ready()


def test_after_a_power_cut_each_custodian_approves_every_manager_at_once(night: Night) -> None:
    escrow, agents = night.escrow, night.agents
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda a: a.daemon.stop(), agents))
        after = time.monotonic()
        list(pool.map(lambda a: a.daemon.start(), agents))
    t1 = time.monotonic()
    requests = {waiting(agent, 2, after) for agent in agents}
    print(f"\nstop {after - t0:.1f} s, start {t1 - after:.1f} s, all asking "
          f"{time.monotonic() - t1:.1f} s later")
    listed = ok(escrow.as_custodian("carol", "requests"))
    assert f"3 managers of {night.cluster_id} locked within" in listed
    for custodian in ("alice", "carol"):
        approved = ok(escrow.as_custodian(custodian, "approve", "--cluster", night.cluster_id,
                                          "--all", "--yes"))
        assert "3 approved, 0 refused" in approved
    started = time.monotonic()
    for agent in agents:
        agent.wait_state("active")
    print(f"\nsecond batch -> all three active: {time.monotonic() - started:.2f} s, "
          f"swarm whole {night.all_ready():.2f} s later")
    batches = [d for e, d in escrow.audit("custodian.approve_batch")]
    assert [sorted(b["approved"]) for b in batches[-2:]] == [sorted(requests)] * 2


def test_a_patch_night_window_approves_its_managers_restarts_and_the_deny_window_the_rest(
        night: Night) -> None:
    escrow, (_, second, third) = night.escrow, night.agents
    node_id = second.daemon.api().info()["Swarm"]["NodeID"]
    opened = ok(escrow.as_custodian(
        "alice", "window", "open", "--cluster", night.cluster_id, "--node", node_id,
        "--restarts", "1", "--for", "2h", "--reason", "kernel 6.18 patch night", "--yes"))
    window_id = opened.split("opened ")[1].split()[0]
    ok(escrow.as_custodian("bob", "window", "sign", window_id, "--yes"))
    # The managers the window leaves out, and restarts beyond its count, proceed after the
    # deny window unless a custodian says no.
    ok(escrow.cli("cluster", "set", night.cluster_id, "--approve-after", "1m"))
    try:
        after = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda a: a.daemon.restart(), (second, third)))
        by_window = second.wait_state("active")
        print(f"\nrestart -> active on the window's authority: {by_window:.2f} s")
        waiting(third, 2, after)  # not named in the window
        assert [d["window_id"] for e, d in escrow.audit("window.approve")].count(window_id) == 2
        again = time.monotonic()
        second.daemon.restart()
        waiting(second, 2, again)  # the window's one restart is used
        [shown] = [w for w in json.loads(ok(escrow.as_custodian(
            "carol", "window", "list", "--cluster", night.cluster_id, "--json")))
            if w["window_id"] == window_id]
        assert (shown["used"], shown["state"], sorted(shown["signers"])) == (
            1, "used", ["alice", "bob"])
        assert local_state(third) == "locked"
        # A minute passes for the escrow (its clock moves 70 s ahead, within the 5 min of
        # skew custodians' signed requests may have): both proceed by default.
        night.clock.write_text("+70\n")
        by_default = third.wait_state("active", timeout=60)
        second.wait_state("active", timeout=60)
        print(f"third manager active by default {by_default:.2f} s after the minute passed")
        defaults = {d["node_id"] for e, d in escrow.audit("unseal.approved_by_default")}
        assert {node_id, third.daemon.api().info()["Swarm"]["NodeID"]} <= defaults
    finally:
        ok(escrow.cli("cluster", "set", night.cluster_id, "--approve-after", "off"))
    night.all_ready()
