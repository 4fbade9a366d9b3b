"""The unit files under systemd/: they parse cleanly and keep the settings the agent's
behaviour depends on. (Issue 7's booted box proves what they do under a real systemd.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EX_CONFIG
from lab.commands import REPO

UNITS = REPO / "systemd"
BIN = Path(sys.executable).parent  # where this environment installed escrow and unseal-agent


def settings(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify_without_a_single_warning(tmp_path: Path) -> None:
    # verify checks that ExecStart exists, so point it at this checkout's installed commands.
    for unit in ("escrow.service", "unseal-agent.service"):
        text = (UNITS / unit).read_text().replace("/opt/swarm-unseal/bin/", f"{BIN}/")
        (tmp_path / unit).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.iterdir())],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # unknown keys are only warnings: none allowed


def test_agent_unit_is_resident_for_the_life_of_the_machine_not_of_dockerd() -> None:
    agent = settings("unseal-agent.service")
    # Not stopped with docker, and never starting it: docker.socket would be asked otherwise.
    for tie in ("BindsTo", "Requires", "Wants", "PartOf", "Requisite"):
        assert not any("docker" in value for value in agent.get(tie, [])), tie
    # Started at boot next to docker, not after it, so its imports overlap docker's start.
    assert agent["WantedBy"] == ["multi-user.target"]
    assert not any("docker" in value for value in agent.get("After", []))
    # Back after anything, paced, and never left failed by a start limit.
    assert agent["Restart"] == ["always"]
    assert agent["RestartSec"] == ["5s"]
    assert agent["StartLimitIntervalSec"] == ["0"]
    assert agent["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert agent["Type"] == ["notify"]
    assert agent["WatchdogSec"]
    assert agent["CapabilityBoundingSet"] == [""]


def test_escrow_unit_runs_unprivileged_with_its_pin_as_a_credential() -> None:
    escrow = settings("escrow.service")
    assert escrow["User"] == ["escrow"]
    assert escrow["Type"] == ["notify"]
    assert escrow["LoadCredential"] == ["hsm-pin:/etc/escrow/hsm-pin"]
    assert "u escrow" in (UNITS / "escrow.sysusers").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_tpm_drop_in_lets_the_agent_reach_only_the_tpm_and_keeps_its_store_in_state(
        tmp_path: Path) -> None:
    drop_in = settings("unseal-agent-tpm.conf")
    assert drop_in["DeviceAllow"] == ["/dev/tpmrm0 rw"]
    assert drop_in["PrivateDevices"] == ["no"]
    assert drop_in["LoadCredential"] == ["agent-key-pin:/etc/unseal-agent/agent-key-pin"]
    assert drop_in["StateDirectory"] == ["unseal-agent/tpm2-pkcs11"]
    assert sorted(drop_in["Environment"]) == [
        "TPM2_PKCS11_STORE=/var/lib/unseal-agent/tpm2-pkcs11",
        "TPM2_PKCS11_TCTI=device:/dev/tpmrm0"]
    assert "DevicePolicy" not in drop_in  # auto: DeviceAllow= plus the pseudo devices only
    # The unit as systemd reads it with the drop-in: its [Service] settings after the unit's.
    unit = (UNITS / "unseal-agent.service").read_text().replace("/opt/swarm-unseal/bin/",
                                                                 f"{BIN}/")
    service = (UNITS / "unseal-agent-tpm.conf").read_text().split("[Service]\n", 1)[1]
    merged = unit.replace("\n[Install]\n", f"\n{service}\n[Install]\n")
    (tmp_path / "unseal-agent.service").write_text(merged)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "unseal-agent.service")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    readme = (REPO / "README.md").read_text()
    assert ("systemd/unseal-agent-tpm.conf -D /etc/systemd/system/unseal-agent.service.d/"
            "tpm.conf") in readme
