"""`unseal-agent enroll` on a real dockerd manager against a real escrow."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lab.agent import AgentNode
from lab.commands import REPO
from lab.dockerd import Dockerd
from lab.net import free_port
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow



def agent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    return subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
                          check=False)


def test_enroll_refuses_without_autolock_then_enrolls_and_deposits_once(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    api = dockerd.api()
    api.init_swarm(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{free_port()}")
    cluster_id = api.info()["Swarm"]["Cluster"]["ID"]
    root_ca = dockerd.data_root / "swarm" / "certificates" / "swarm-root-ca.crt"
    added = escrow.cli("cluster", "add", cluster_id, "--root-ca", str(root_ca), "--threshold",
                       "2", "--slots", "auto,auto,alice,bob")
    assert added.returncode == 0, added.stderr
    state = tmp_path / "agent-state"
    config = tmp_path / "config.toml"
    config.write_text(f'escrow_url = "{escrow.url}"\nescrow_ca = "{escrow.ca}"\n'
                      f'docker_host = "{dockerd.socket}"\ndocker_root = "{dockerd.data_root}"\n'
                      f'state_dir = "{state}"\n')

    refused = agent(config, "enroll")
    assert refused.returncode == 1
    assert "autolock is off" in refused.stderr
    assert "docker swarm update --autolock=true" in refused.stderr

    swarm = api.inspect_swarm()
    spec = swarm["Spec"]
    spec.setdefault("EncryptionConfig", {})["AutoLockManagers"] = True
    api.update_swarm(version=swarm["Version"]["Index"], swarm_spec=spec)

    first = agent(config, "enroll")
    assert first.returncode == 0, first.stderr
    assert "deposited the current unlock key as version 1" in first.stdout
    assert stat.S_IMODE((state / "agent-key.pem").stat().st_mode) == 0o600
    # The escrow's deposit key is pinned on first use, and kept by a second enrollment.
    assert "(pinned now, on first use" in first.stdout
    pin = json.loads((state / "state.json").read_text())["deposit_key_sha256"]
    assert f"deposits go only to the escrow's deposit key sha256 {pin}" in first.stdout
    second = agent(config, "enroll")
    assert second.returncode == 0, second.stderr
    assert "already holds the current unlock key" in second.stdout
    assert f"deposit key sha256 {pin}\n" in second.stdout

    nodes = json.loads(escrow.cli("node", "list", "--json").stdout)
    assert [(n["cluster_id"], n["status"]) for n in nodes] == [(cluster_id, "active")]
    versions = json.loads(escrow.cli("key", "list", "--cluster", cluster_id, "--json").stdout)
    assert [v["version"] for v in versions] == [1]
    key = api.get_unlock_key()["UnlockKey"]
    assert key not in first.stdout + first.stderr + second.stdout + second.stderr


def test_bad_agent_config_names_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('escrow_url = "https://x"\nescrow_ca = "/ca.pem"\nescrow_pin = "1"\n')
    result = agent(config, "enroll")
    assert result.returncode == 1
    assert "unknown setting 'escrow_pin'" in result.stderr
    config.write_text('escrow_url = "http://x"\nescrow_ca = "/ca.pem"\n')
    assert "is not an https:// URL" in agent(config, "enroll").stderr


def test_status_reports_node_lock_state_enrollment_escrow_and_versions(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    swarm = dockerd.init_swarm()
    root_ca = dockerd.data_root / "swarm" / "certificates" / "swarm-root-ca.crt"
    added = escrow.cli("cluster", "add", swarm["Cluster"]["ID"], "--root-ca", str(root_ca),
                       "--threshold", "2", "--slots", "auto,auto,alice,bob")
    assert added.returncode == 0, added.stderr
    node = AgentNode(tmp_path / "node", dockerd, escrow)
    before = node.command("status", "--json")
    assert before.returncode == 1
    assert json.loads(before.stdout)["enrolled"] is False
    assert "run `unseal-agent enroll`" in " ".join(json.loads(before.stdout)["problems"])
    node.enroll()

    report = node.command("status", "--json")
    assert report.returncode == 0, report.stderr
    status = json.loads(report.stdout)
    assert (status["node_id"], status["cluster_id"], status["role"]) == (
        swarm["NodeID"], swarm["Cluster"]["ID"], "swarm-manager")
    assert (status["lock_state"], status["enrolled"], status["escrow_reachable"]) == (
        "active", True, True)
    assert status["escrowed_versions"] == [1]
    assert status["last_unlock"] is None
    text = node.command("status")
    assert "lock state:     active" in text.stdout
    assert "escrowed keys:  v1" in text.stdout

    escrow.stop()
    dockerd.stop()
    down = node.command("status", "--json")
    escrow.start()
    assert down.returncode == 1
    status = json.loads(down.stdout)
    assert (status["lock_state"], status["escrow_reachable"]) == ("docker unreachable", False)
    assert any("the escrow at" in problem for problem in status["problems"])
