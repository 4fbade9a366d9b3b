"""The multi-manager laboratory itself: three real autolocked managers in network namespaces, a
restarted one comes back locked and rejoins once unlocked, and nothing outlives the lab."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import docker
import pytest

from lab.dockerd import Dockerd
from lab.netlab import NetLab, ready_managers, wait_for

pytestmark = pytest.mark.slow


def leader(daemons: list[Dockerd], asking: Dockerd) -> Dockerd:
    nodes = asking.api().nodes()
    name = next(node["Description"]["Hostname"] for node in nodes
                if node.get("ManagerStatus", {}).get("Leader"))
    return next(daemon for daemon in daemons if daemon.hostname == name)


def test_a_restarted_manager_is_locked_until_unlocked_then_rejoins(
        three_managers: list[Dockerd]) -> None:
    first = three_managers[0]
    names = {daemon.hostname for daemon in three_managers}
    assert ready_managers(first) == names
    assert first.api().inspect_swarm()["Spec"]["EncryptionConfig"]["AutoLockManagers"]
    boss = leader(three_managers, first)
    restarted = next(daemon for daemon in three_managers if daemon is not boss)
    node_id = restarted.api().info()["Swarm"]["NodeID"]
    key = boss.api().get_unlock_key()["UnlockKey"]

    restarted.stop()
    restarted.start()
    assert restarted.state() == "locked"
    with pytest.raises(docker.errors.APIError, match="invalid key"):
        restarted.api().unlock_swarm("SWMKEY-1-" + "A" * 43)
    assert restarted.state() == "locked"

    restarted.api().unlock_swarm(key)
    restarted.wait_state("active")
    boss = leader(three_managers, boss)  # a leader change while one of three restarts is legal

    def rejoined() -> bool:
        node = next(node for node in boss.api().nodes() if node["ID"] == node_id)
        return bool(node["Status"]["State"] == "ready"
                    and node["ManagerStatus"]["Reachability"] == "reachable")

    wait_for(rejoined, 60, f"{restarted.hostname} ready and reachable again")
    assert ready_managers(boss) == names


def crash_and_fail(lab: NetLab) -> None:
    with lab:
        daemons = lab.managers(2)
        assert daemons[1].process is not None
        # A crashed dockerd leaves its mounts, and perhaps its containerd, for close() to find.
        os.kill(daemons[1].process.pid, signal.SIGKILL)
        raise RuntimeError("test failed midway")


def test_the_lab_leaves_nothing_behind_even_after_a_failure_and_a_crash() -> None:
    lab = NetLab(nodes=2)
    with pytest.raises(RuntimeError, match="test failed midway"):
        crash_and_fail(lab)

    assert lab.leftovers() == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert lab.name not in namespaces
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert lab.tag not in links
    mounts = Path("/proc/mounts").read_text()
    assert all(str(daemon.root) not in mounts for daemon in lab.daemons)
