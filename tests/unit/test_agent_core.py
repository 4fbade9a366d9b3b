"""The agent's pure pieces: back-off, settings, its state file, the notify protocol on a real
datagram socket, and log lines."""

from __future__ import annotations

import logging
import random
import secrets
import socket
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import config as agent_config
from agent import state as agent_state
from agent.backoff import Backoff
from agent.errors import AgentError
from agent.log import StderrFormatter, under_journald
from agent.release import candidate_keys
from agent.state import AgentState, LastUnlock
from escrow.core import protocol, shares
from escrow.core.notify import Notifier, watchdog_interval
from escrow.core.protocol import ReleasedShare, RequestStatus
from escrow.core.unlockkey import UnlockKey


def test_backoff_grows_with_jitter_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(first=1.0, cap=16.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    for step, delay in zip([1, 2, 4, 8, 16, 16, 16, 16, 16, 16], delays, strict=True):
        assert step / 2 <= delay <= step
    assert len(set(delays)) == len(delays)  # jittered: no two agents in lockstep
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('escrow_url = "https://escrow:8443"\nescrow_ca = "/ca.pem"\n' + text)
    return path


def test_config_reads_seconds_and_lets_flags_override(tmp_path: Path) -> None:
    path = write(tmp_path, "key_check_seconds = 30\nretry_max_seconds = 2.5\n")
    loaded = agent_config.load(path, {"retry_max_seconds": 9.0, "docker_host": None})
    assert (loaded.key_check_seconds, loaded.retry_max_seconds) == (30.0, 9.0)
    assert loaded.docker_host == "unix:///var/run/docker.sock"
    assert loaded.state_path == Path("/var/lib/unseal-agent/state.json")


@pytest.mark.parametrize(("line", "named"), [
    ('approval_wait_seconds = 600', "approval_wait_seconds must be a number of seconds"),
    ('retry_max_seconds = "60"', "retry_max_seconds must be a number of seconds"),
    ('docker_poll_seconds = true', "docker_poll_seconds must be a number of seconds"),
    ('docker_host = 5', "docker_host must be a non-empty string"),
    ('poll = 1', "unknown setting 'poll'"),
])
def test_config_errors_name_the_bad_setting(tmp_path: Path, line: str, named: str) -> None:
    with pytest.raises(AgentError) as caught:
        agent_config.load(write(tmp_path, line + "\n"), {})
    assert named in caught.value.message


def test_state_round_trips_atomically_with_owner_only_permissions(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    assert agent_state.load(path) == AgentState()
    saved = AgentState("node", "cluster", "now", {"ab": 1, "cd": 2}, "10",
                       LastUnlock("then", 2, "r-1", 0.5))
    agent_state.save(path, saved)
    assert agent_state.load(path) == saved
    assert saved.versions() == [2, 1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_damaged_state_file_is_reported_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"node_id": ')
    with pytest.raises(AgentError) as caught:
        agent_state.load(path)
    assert "damaged" in caught.value.message
    assert "unseal-agent enroll" in caught.value.hint


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "n"))
    receiver.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    return receiver


def test_notifier_sends_ready_status_changes_and_watchdog(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    notifier.ready("watching docker")
    notifier.status("locked")
    notifier.status("locked")  # unchanged: not sent again
    notifier.watchdog()
    received = [notify_socket.recv(4096).decode() for _ in range(3)]
    assert received == ["READY=1\nSTATUS=watching docker", "STATUS=locked", "WATCHDOG=1"]


def test_notifier_survives_a_notify_socket_that_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    notifier = Notifier()
    notifier.ready("x")
    notifier.watchdog()
    assert [r.message for r in caplog.records].count(
        f"cannot reach systemd's notify socket {tmp_path / 'missing'} (No such file or "
        "directory); carrying on without it") == 1


def test_watchdog_interval_is_half_of_systemds_and_only_for_this_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_stderr_log_lines_carry_the_structured_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    record = logging.LogRecord("unseal-agent", logging.WARNING, __file__, 1, "locked %s", ("x",),
                               None)
    record.NODE_ID, record.REQUEST_ID = "n1", "r-1"
    line = StderrFormatter().format(record)
    assert line.endswith("warning: locked x [node_id=n1 request_id=r-1]")
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not under_journald()


def released(request_id: str, cluster: str, version: int, key: UnlockKey, count: int,
             peer: X25519PrivateKey) -> list[ReleasedShare]:
    mnemonics = shares.split(key, 2, 3)[:count]
    return [ReleasedShare(
        version=version, fingerprint=key.fingerprint(cluster), slot=slot, holder="auto",
        sealed_share=protocol.b64e(protocol.HPKE.encrypt(
            mnemonic.encode(), peer.public_key(),
            info=protocol.share_info(request_id, cluster, version, slot))))
        for slot, mnemonic in enumerate(mnemonics)]


def test_candidate_keys_come_newest_first_and_leave_out_refused_and_incomplete_versions(
        ) -> None:
    ephemeral = X25519PrivateKey.generate()
    old, new, newest = (UnlockKey(secrets.token_bytes(32)) for _ in range(3))
    status = RequestStatus(
        request_id="r-1", cluster_id="c", node_id="n", state="pending", created_at="",
        expires_at="", threshold=2, needed=1, approvals=[],
        releases=(released("r-1", "c", 3, newest, 1, ephemeral)  # waits for a custodian
                  + released("r-1", "c", 2, new, 2, ephemeral)
                  + released("r-1", "c", 1, old, 2, ephemeral)))
    assert list(candidate_keys(status, ephemeral)) == [(2, new), (1, old)]
    assert list(candidate_keys(status, ephemeral, frozenset({2}))) == [(1, old)]
    assert list(candidate_keys(status, ephemeral, frozenset({1, 2}))) == []
