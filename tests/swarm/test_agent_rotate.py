"""`unseal-agent rotate` and the running agent's rotation watch, on a real autolocked manager
with a real escrow."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.rotate import rotate
from escrow.core import unlockkey
from escrow.core.unlockkey import UnlockKey
from lab.agent import enrolled_manager
from lab.dockerd import Dockerd
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow



def versions(escrow: EscrowProcess, cluster_id: str) -> list[tuple[int, str]]:
    listed = escrow.cli("key", "list", "--cluster", cluster_id, "--json")
    assert listed.returncode == 0, listed.stderr
    return [(v["version"], v["fingerprint"]) for v in json.loads(listed.stdout)]


def current_key(dockerd: Dockerd) -> UnlockKey:
    return unlockkey.parse(dockerd.api().get_unlock_key()["UnlockKey"])


def test_rotate_refuses_while_the_escrow_is_down_then_rotates_and_escrows_in_one_step(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob")
    cluster_id = dockerd.api().info()["Swarm"]["Cluster"]["ID"]
    before = current_key(dockerd)
    escrow.stop()
    refused = node.command("rotate")
    assert refused.returncode == 1
    assert "the unlock key was NOT rotated" in refused.stderr
    assert current_key(dockerd) == before
    escrow.start()
    rotated = node.command("rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "the escrow holds the new key as version 2 (old: version 1)" in rotated.stdout
    after = current_key(dockerd)
    assert after != before
    assert Docker(dockerd.socket).autolock()  # the spec went along with the rotation
    (v2, fp2), (v1, fp1) = versions(escrow, cluster_id)
    assert (v2, v1) == (2, 1)
    assert after.fingerprint(cluster_id).startswith(fp2)
    assert before.fingerprint(cluster_id).startswith(fp1)
    for text in (rotated.stdout, rotated.stderr, refused.stderr):
        assert after.swmkey() not in text
        assert before.swmkey() not in text


def test_a_rotation_the_escrow_missed_fails_loudly_and_the_running_agent_deposits_it(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob",
                   key_check_seconds=1)
    cluster_id = dockerd.api().info()["Swarm"]["Cluster"]["ID"]
    node.write_config()
    real_rotate = Docker.rotate_unlock_key

    def rotate_then_lose_the_escrow(self: Docker) -> UnlockKey:
        key = real_rotate(self)
        escrow.stop()  # the outage starts right after dockerd rotated
        return key

    monkeypatch.setattr(Docker, "rotate_unlock_key", rotate_then_lose_the_escrow)
    logger = logging.getLogger("rotate-test")
    with pytest.raises(AgentError) as caught:
        asyncio.run(rotate(agent_config.load(node.config, {}), logger, attempts=3,
                           first_retry=0.2))
    assert "the new key is NOT escrowed" in caught.value.message
    assert [r.levelno for r in caplog.records if "NOT escrowed" in r.getMessage()] == [
        logging.CRITICAL]
    new_key = current_key(dockerd)
    escrow.start()
    assert [v for v, _ in versions(escrow, cluster_id)] == [1]

    node.start()
    try:
        deadline = time.monotonic() + 30
        while len(versions(escrow, cluster_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        node.stop()
    (v2, fp2), _ = versions(escrow, cluster_id)
    assert v2 == 2
    assert new_key.fingerprint(cluster_id).startswith(fp2)
    assert "escrowed the manager's new unlock key as version 2" in node.log()
