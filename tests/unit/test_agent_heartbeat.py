"""The agent's heartbeats (agent/heartbeat.py): what a beat says, how it is signed, how the
client sends it, and who sends one; the keys and the swarm certificate are made here, and the
escrow is a fake that records what it got."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel

from agent import config as agent_config
from agent import deposit_key
from agent import heartbeat as agent_heartbeat
from agent import state as agent_state
from agent.backoff import Backoff
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.heartbeat import AGENT_VERSION, JITTER, Heartbeat, beat_request, lock_state, pause
from agent.loaded_key import LoadedKey
from agent.log import NodeLog
from agent.parts import Parts
from agent.runtime import Runtime
from agent.swarm_identity import CERT_DIR, NodeIdentity
from escrow.core import protocol
from escrow.core.notify import Notifier
from escrow.core.protocol import (
    HeartbeatRequest,
    HeartbeatResponse,
    InfoResponse,
    NonceResponse,
)
from escrow.core.states import LockState
from escrow.https import Response
from lab.certs import make_node_cert, make_root_ca

AGENT_KEY = ec.generate_private_key(ec.SECP256R1())
IDENTITY = NodeIdentity(node_id="n" * 25, cluster_id="c" * 25, role="swarm-manager",
                        cert_pem="", kek_version="3")
BOOT = "3f0c8a52-1d4e-4b6a-9c7e-0a1b2c3d4e51"
NONCE = b"\x01" * 32
DEPOSIT_KEY = X25519PrivateKey.generate().public_key().public_bytes_raw()


def beat(lock: LockState = LockState.LOCKED, *, goodbye: bool = False, interval: float = 30.0,
         nonce: bytes = NONCE) -> HeartbeatRequest:
    return beat_request(IDENTITY, lock, nonce, boot=BOOT, uptime=61.9, interval=interval,
                        goodbye=goodbye, agent_key=AGENT_KEY)


def verifies(signed: HeartbeatRequest, nonce: bytes = NONCE) -> bool:
    return protocol.verify(AGENT_KEY.public_key(), signed.signature,
                           protocol.heartbeat_payload(signed, nonce))


@pytest.mark.parametrize(("swarm_state", "wanted"), [
    ("active", LockState.UNLOCKED), ("locked", LockState.LOCKED), (None, LockState.LOCKED),
    ("pending", LockState.LOCKED), ("error", LockState.LOCKED), ("inactive", LockState.LOCKED),
])
def test_only_an_active_manager_is_reported_unlocked_and_a_silent_dockerd_is_locked(
        swarm_state: str | None, wanted: LockState) -> None:
    assert lock_state(swarm_state) is wanted


def test_a_beat_says_who_what_and_when_and_is_signed_by_the_agent_key_over_the_nonce() -> None:
    signed = beat(LockState.UNLOCKED)
    assert (signed.cluster_id, signed.node_id, signed.boot_id, signed.kek_version) == (
        "c" * 25, "n" * 25, BOOT, "3")
    assert (signed.lock_state, signed.uptime_seconds, signed.interval_seconds,
            signed.goodbye) == ("unlocked", 61, 30, False)
    assert signed.agent_version == AGENT_VERSION
    assert 0 < len(AGENT_VERSION) <= 32
    assert protocol.b64d(signed.nonce) == NONCE
    assert verifies(signed)


def test_a_beat_signed_for_one_nonce_or_lock_state_does_not_verify_for_another() -> None:
    signed = beat(LockState.UNLOCKED)
    assert not verifies(signed, b"\x02" * 32)
    assert not verifies(signed.model_copy(update={"lock_state": "locked"}))
    assert not verifies(signed.model_copy(update={"goodbye": True}))


def test_a_goodbye_is_a_beat_of_its_own_signature() -> None:
    goodbye = beat(goodbye=True)
    assert goodbye.goodbye
    assert verifies(goodbye)


def test_beats_are_spread_over_the_last_fifth_of_the_interval_and_never_late() -> None:
    # Managers that came back from one power cut beat at different times, and no pause is
    # longer than the interval the escrow counts missed beats against.
    assert pause(30.0, 0.0) == 30.0
    assert pause(30.0, 0.999999) == pytest.approx(30.0 * (1 - JITTER))
    pauses = [pause(30.0, draw / 1000) for draw in range(1000)]
    assert all(30.0 * (1 - JITTER) < p <= 30.0 for p in pauses)
    assert max(pauses) - min(pauses) > 5.9


def test_a_fractional_interval_is_announced_rounded_up_so_no_beat_counts_as_missed() -> None:
    assert beat(interval=7.2).interval_seconds == 8


class FakeEscrow(EscrowClient):
    """Offers ``offered`` as its deposit key, hands out NONCE and records what was asked: the
    client's own calls, answered where a request would leave."""

    def __init__(self, offered: bytes = DEPOSIT_KEY) -> None:
        super().__init__("https://escrow.invalid:8443", ssl.create_default_context())
        self.offered = offered
        self.sent: list[tuple[str, str, Any]] = []

    async def _send(self, index: int, method: str, target: str, data: bytes | None,
                    timeout: float) -> Response:
        body = HeartbeatRequest.model_validate_json(data) if target == "/v1/heartbeat" \
            and data else None
        self.sent.append((method, target, body))
        answer: BaseModel = HeartbeatResponse(recorded=True)
        if target == "/v1/info":
            answer = InfoResponse(api="v1", deposit_public_key=protocol.b64e(self.offered),
                                  server_time="now")
        elif target == "/v1/nonce":
            answer = NonceResponse(nonce=protocol.b64e(NONCE), expires_at="later")
        return Response(200, answer.model_dump_json().encode())


class SilentEscrow(FakeEscrow):
    """Takes the connection, and never answers (until the request's time is up)."""

    async def _send(self, index: int, method: str, target: str, data: bytes | None,
                    timeout: float) -> Response:
        async with asyncio.timeout(timeout):
            await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_heartbeat_seconds_defaults_to_30_and_refuses_values_the_escrow_would(
        tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('escrow_url = "https://escrow:8443"\nescrow_ca = "/nonexistent/ca.pem"\n')
    config.chmod(0o600)
    assert agent_config.load(config, {}).heartbeat_seconds == 30.0
    assert agent_config.load(config, {"heartbeat_seconds": 5}).heartbeat_seconds == 5
    for wrong in (4.9, 3601, "30", True):
        with pytest.raises(AgentError) as caught:
            agent_config.load(config, {"heartbeat_seconds": wrong})
        assert caught.value.message.startswith(
            "--heartbeat-seconds: heartbeat_seconds must be a number of seconds from 5 to 3600")
        assert caught.value.hint == "for example heartbeat_seconds = 20"


def agent_on(tmp_path: Path, client: EscrowClient, *, enrolled: bool = True) -> Heartbeat:
    """A heartbeat of an agent whose manager's certificates and agent key are on disk, and
    whose state says it enrolled (or not)."""
    certs = tmp_path / "docker" / CERT_DIR
    certs.mkdir(parents=True)
    node = make_node_cert(make_root_ca(), IDENTITY.node_id, IDENTITY.cluster_id)
    (certs / "swarm-node.crt").write_bytes(node.pem)
    (certs / "swarm-node.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nkek-version: 3\n\n"
                                           b"AAAA\n-----END PRIVATE KEY-----\n")
    config = AgentConfig(escrow_url=("https://escrow.invalid:8443",),
                         escrow_ca=Path("/nonexistent"), docker_root=tmp_path / "docker",
                         state_dir=tmp_path / "state", heartbeat_seconds=7.5)
    config.state_dir.mkdir()
    config.agent_key_path.write_bytes(AGENT_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    config.agent_key_path.chmod(0o600)
    if enrolled:
        agent_state.save(config.state_path, agent_state.AgentState(
            node_id=IDENTITY.node_id, cluster_id=IDENTITY.cluster_id,
            deposit_key_sha256=deposit_key.fingerprint(DEPOSIT_KEY)))
    log = NodeLog(logging.getLogger("test-heartbeat"))
    return Heartbeat(Parts(config, Docker(config.docker_host), client, Runtime(Notifier()),
                           log, LoadedKey(config, log), Backoff()))


def test_a_stopping_agent_says_goodbye_with_the_last_state_it_saw_signed_by_its_key(
        tmp_path: Path) -> None:
    client = FakeEscrow()
    heartbeat = agent_on(tmp_path, client)
    heartbeat.saw("active")
    heartbeat.saw(None)  # dockerd stopped: the manager serves nothing
    asyncio.run(heartbeat.goodbye())
    (_, info_path, _), (_, nonce_path, _), (_, path, body) = client.sent
    assert (info_path, nonce_path, path) == ("/v1/info", "/v1/nonce", "/v1/heartbeat")
    assert isinstance(body, HeartbeatRequest)
    assert (body.node_id, body.kek_version, body.lock_state, body.goodbye,
            body.interval_seconds) == (IDENTITY.node_id, "3", "locked", True, 8)
    assert verifies(body)


def test_an_escrow_offering_another_deposit_key_gets_no_beat(tmp_path: Path) -> None:
    impersonator = FakeEscrow(offered=X25519PrivateKey.generate().public_key().public_bytes_raw())
    asyncio.run(agent_on(tmp_path, impersonator).goodbye())
    assert [path for _, path, _ in impersonator.sent] == ["/v1/info"]


def test_an_agent_that_did_not_enroll_this_node_sends_no_beat(tmp_path: Path) -> None:
    client = FakeEscrow()
    asyncio.run(agent_on(tmp_path, client, enrolled=False).goodbye())
    assert client.sent == []


def test_a_goodbye_to_an_escrow_that_does_not_answer_is_given_up_after_its_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ) -> None:
    monkeypatch.setattr(agent_heartbeat, "GOODBYE_TIMEOUT", 0.2)
    heartbeat = agent_on(tmp_path, SilentEscrow())
    heartbeat.saw("active")
    with caplog.at_level(logging.WARNING, "test-heartbeat"):
        asyncio.run(asyncio.wait_for(heartbeat.goodbye(), 5))
    assert caplog.messages == ["goodbye heartbeat not delivered: the escrow at "
                               "https://escrow.invalid:8443 did not answer within 0.2 s (check "
                               "the escrow service and the network)"]
