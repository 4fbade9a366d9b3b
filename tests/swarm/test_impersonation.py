"""An impersonator of the escrow, built from a stolen backup, gets no unlock key from agents.

The attack: someone with a backup of the escrow restores it on a machine of their own with a
fresh SoftHSM token (they do not have the real one, so the wrapped deposit key cannot be unwrapped
and the escrow makes a new one), adds the escrow's TLS key (backups leave it out now; an old
backup, or a copy of the escrow host's disk, still has it), and gets the agents' traffic
(DNS, a route). The agents' pinned CA is unchanged and trusts the impersonator's certificate.
Before agents pinned the deposit key, their next deposit was encrypted to the impersonator's
key; now they refuse it and send nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.docker_state import Docker
from escrow.core import protocol
from lab.agent import AgentNode, enrolled_manager
from lab.commands import run_escrow
from lab.dockerd import Dockerd
from lab.net import free_port
from lab.server import EscrowProcess

pytestmark = pytest.mark.slow


@dataclass
class Impersonator(EscrowProcess):
    """An `escrow serve` of the attacker's; agents reach it at their configured CA file."""
    real_ca: Path = field(default_factory=Path)

    @property
    def ca(self) -> Path:
        return self.real_ca


def deposit_key_sha256(escrow: EscrowProcess) -> str:
    context = ssl.create_default_context(cafile=str(escrow.ca))
    with urllib.request.urlopen(escrow.url + "/v1/info", context=context,  # noqa: S310
                                timeout=10) as answer:
        info = json.loads(answer.read())
    return hashlib.sha256(protocol.b64d(info["deposit_public_key"])).hexdigest()


def impersonator(escrow: EscrowProcess, base: Path) -> Impersonator:
    """A second `escrow serve` made from a backup of ``escrow``, with a fresh token and the
    escrow's own TLS certificate and key."""
    base.mkdir()
    backup = base / "stolen.backup"
    made = escrow.cli("backup", "--out", str(backup))
    assert made.returncode == 0, made.stderr
    fake = Impersonator(base, free_port(), {}, real_ca=escrow.ca)
    restored = run_escrow("restore", "--from", str(backup), data_dir=fake.data_dir)
    assert restored.returncode == 0, restored.stderr
    fresh = base / "fresh-token"
    made_token = run_escrow("init", data_dir=fresh)  # a token of the attacker's own
    assert made_token.returncode == 0, made_token.stderr
    shutil.copytree(fresh / "softhsm", fake.data_dir / "softhsm")
    shutil.copy2(fresh / "hsm-pin", fake.data_dir / "hsm-pin")
    # The secrets in `meta` (the deposit key among them) are wrapped by the real token: the
    # attacker drops them, and their escrow makes new ones.
    with sqlite3.connect(fake.data_dir / "escrow.db") as db:
        db.execute("DELETE FROM meta")
    db.close()
    assert not (fake.data_dir / "tls" / "server.key").exists()  # not in the backup
    shutil.copy2(escrow.data_dir / "tls" / "server.key", fake.data_dir / "tls" / "server.key")
    try:
        fake.start()
        # The agents' CA trusts it, and it offers a deposit key of its own.
        assert fake.health()[0] == 200
        assert deposit_key_sha256(fake) != deposit_key_sha256(escrow)
    except BaseException:
        fake.stop()
        raise
    return fake


def versions(escrow: EscrowProcess, cluster_id: str) -> list[int]:
    listed = escrow.cli("key", "list", "--cluster", cluster_id, "--json")
    assert listed.returncode == 0, listed.stderr
    return [v["version"] for v in json.loads(listed.stdout)]


def pinned(node: AgentNode) -> str:
    return str(json.loads((node.state_dir / "state.json").read_text())["deposit_key_sha256"])


def test_escrow_impersonator_with_a_stolen_backup_gets_no_deposit(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob",
                            key_check_seconds=1)
    cluster_id = dockerd.api().info()["Swarm"]["Cluster"]["ID"]
    real = deposit_key_sha256(escrow)
    assert pinned(node) == real  # trusted on first use, at enrollment
    fake = impersonator(escrow, tmp_path / "attacker")
    try:
        offered = deposit_key_sha256(fake)
        before = fake.audit()
        node.escrow = fake  # the agent's escrow_url now reaches the impersonator
        refusal = (f"the escrow at {fake.url} offers deposit key sha256 {offered}, this agent "
                   f"pinned {real} at enrollment")

        # `unseal-agent rotate`: refused before anything changes.
        key = dockerd.api().get_unlock_key()["UnlockKey"]
        rotate = node.command("rotate")
        assert rotate.returncode == 1
        assert refusal in rotate.stderr
        assert "the unlock key was NOT rotated" in rotate.stderr
        assert "impersonation" in rotate.stderr
        assert dockerd.api().get_unlock_key()["UnlockKey"] == key

        # `unseal-agent status` names the problem.
        status = node.command("status", "--json")
        assert status.returncode == 1
        assert any(refusal in problem for problem in json.loads(status.stdout)["problems"])

        # Re-enrolling is no way round the pin.
        enroll = node.command("enroll")
        assert enroll.returncode == 1
        assert refusal in enroll.stderr
        assert pinned(node) == real

        # The running agent, after a rotation by hand that the escrow missed: it must deposit
        # the new key, and refuses to, loudly (crit, and the unit's status).
        new_key = Docker(dockerd.socket).rotate_unlock_key()
        notify = node.start()
        try:
            notify.wait_for(lambda line: line.startswith("STATUS=") and "NOT escrowed" in line
                            and f"deposit key sha256 {offered[:16]}" in line
                            and "nothing was sent" in line, timeout=30)
        finally:
            assert node.stop() == 0
        assert f"critical: {refusal}" in node.log()

        # The impersonator learnt nothing: no record of anything but the agents' reads, no new
        # key version, and the unlock keys are in no answer or log of its.
        assert fake.audit() == before
        assert versions(fake, cluster_id) == [1]
        for secret in (key, new_key.swmkey()):
            assert secret not in fake.log() + rotate.stderr + enroll.stderr + node.log()
    finally:
        fake.stop()

    # The real escrow answers again (DNS fixed): the agent deposits the missed key there.
    node.escrow = escrow
    notify = node.start()
    try:
        notify.wait_for(
            lambda line: line.startswith("STATUS=unlocked") and "NOT escrowed" not in line,
            timeout=30)
    finally:
        assert node.stop() == 0
    assert versions(escrow, cluster_id) == [2, 1]
    assert new_key.fingerprint(cluster_id).startswith(
        json.loads(escrow.cli("key", "list", "--cluster", cluster_id, "--json").stdout)[0][
            "fingerprint"])


def test_a_node_enrolled_before_pinning_pins_its_escrow_and_then_refuses_an_impersonator(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob")
    state_path = node.state_dir / "state.json"
    legacy = json.loads(state_path.read_text())
    del legacy["deposit_key_sha256"]  # as an agent of before the pin wrote it
    state_path.write_text(json.dumps(legacy))
    notify = node.start()
    try:
        notify.wait_for(lambda line: line.startswith("STATUS=unlocked"))
    finally:
        assert node.stop() == 0
    real = deposit_key_sha256(escrow)
    assert f"pinned the escrow's deposit key sha256 {real} on first use" in node.log()
    assert pinned(node) == real

    fake = impersonator(escrow, tmp_path / "attacker")
    try:
        node.escrow = fake
        rotate = node.command("rotate")
        assert rotate.returncode == 1
        assert f"this agent pinned {real} at enrollment" in rotate.stderr
        assert "NOT rotated" in rotate.stderr
    finally:
        fake.stop()


def test_an_escrow_rebuilt_with_a_new_deposit_key_is_trusted_only_given_its_fingerprint(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    """The legitimate change: an escrow rebuilt from scratch has a new deposit key (here the
    backup-made escrow stands in for it). The operator reads its fingerprint on the escrow
    host and re-enrolls with it; a wrong fingerprint is refused like a wrong key."""
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob")
    cluster_id = dockerd.api().info()["Swarm"]["Cluster"]["ID"]
    rebuilt = impersonator(escrow, tmp_path / "rebuilt")
    try:
        new = deposit_key_sha256(rebuilt)
        node.escrow = rebuilt
        wrong = node.command("enroll", "--escrow-deposit-key-sha256", "ab" * 32)
        assert wrong.returncode == 1
        assert f"pinned {'ab' * 32} in escrow_deposit_key_sha256" in wrong.stderr
        enrolled = node.command("enroll", "--escrow-deposit-key-sha256", new.upper())
        assert enrolled.returncode == 0, enrolled.stderr
        assert f"deposits go only to the escrow's deposit key sha256 {new}" in enrolled.stdout
        assert pinned(node) == new
        rotated = node.command("rotate")  # without the flag: the new pin is in state.json
        assert rotated.returncode == 0, rotated.stderr
        assert versions(rebuilt, cluster_id) == [2, 1]
    finally:
        rebuilt.stop()
