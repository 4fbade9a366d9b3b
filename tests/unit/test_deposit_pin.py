"""The agent's pin of the escrow's deposit key: the pure check, and that a deposit to any other
key sends nothing (agent/deposit_key.py, agent/deposit.py, EscrowClient.deposit)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel

from agent import deposit_key
from agent import state as agent_state
from agent.client import EscrowClient
from agent.deposit import ensure_escrowed, pin_deposit_key
from agent.errors import AgentError, DepositKeyMismatch, EscrowUnavailable
from agent.state import AgentState
from escrow.core import protocol
from escrow.core.protocol import InfoResponse
from escrow.core.unlockkey import UnlockKey
from escrow.https import Response

URL = "https://escrow.example:8443"


def raw_key() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


REAL, FAKE = raw_key(), raw_key()
REAL_SHA, FAKE_SHA = hashlib.sha256(REAL).hexdigest(), hashlib.sha256(FAKE).hexdigest()


def test_the_first_deposit_key_seen_is_pinned_by_its_sha256() -> None:
    assert deposit_key.fingerprint(REAL) == REAL_SHA
    assert deposit_key.pin_for(URL, REAL) == REAL_SHA


def test_the_pinned_deposit_key_passes_and_an_impersonators_is_refused_naming_both() -> None:
    assert deposit_key.pin_for(URL, REAL, pinned=REAL_SHA) == REAL_SHA
    deposit_key.check(URL, REAL, REAL_SHA)
    with pytest.raises(DepositKeyMismatch) as caught:
        deposit_key.check(URL, FAKE, REAL_SHA)
    error = caught.value
    assert error.message.startswith(
        f"the escrow at {URL} offers deposit key sha256 {FAKE_SHA}, this agent pinned "
        f"{REAL_SHA} at enrollment")
    assert "not sent" in error.message
    assert "impersonation" in error.hint
    assert "unseal-agent enroll --escrow-deposit-key-sha256" in error.hint
    assert (error.offered, error.pinned) == (FAKE_SHA, REAL_SHA)
    assert isinstance(error, AgentError)


def test_a_configured_fingerprint_wins_over_the_pin_and_is_refused_when_it_differs() -> None:
    # The escrow was rebuilt with a new deposit key and the operator confirmed it.
    assert deposit_key.pin_for(URL, FAKE, configured=FAKE_SHA.upper(),
                               pinned=REAL_SHA) == FAKE_SHA
    with pytest.raises(DepositKeyMismatch) as caught:
        deposit_key.pin_for(URL, FAKE, configured=REAL_SHA, pinned=FAKE_SHA)
    assert "pinned " + REAL_SHA + " in escrow_deposit_key_sha256" in caught.value.message


def test_no_deposit_goes_out_unchecked_without_a_pin() -> None:
    with pytest.raises(AgentError, match=r"no deposit key .* is pinned"):
        deposit_key.check(URL, REAL, "")


@pytest.mark.parametrize("offered", ["", "AAAA", "not base64!", protocol.b64e(b"\1" * 31)])
def test_a_malformed_deposit_key_is_the_escrow_being_unusable(offered: str) -> None:
    with pytest.raises(EscrowUnavailable, match="offers no valid deposit key"):
        deposit_key.offered_key(URL, offered)
    assert deposit_key.offered_key(URL, protocol.b64e(REAL)) == REAL


class FakeEscrow(EscrowClient):
    """EscrowClient's own deposit, with /v1/info answered in memory offering ``offered``, and
    every request that would go out after it recorded instead of sent."""

    def __init__(self, offered: bytes) -> None:
        super().__init__(URL, ssl.create_default_context())
        self.offered = offered
        self.sent: list[str] = []

    async def _send(self, index: int, method: str, target: str, data: bytes | None,
                    timeout: float) -> Response:
        answer: BaseModel = InfoResponse(api="v1", deposit_public_key=protocol.b64e(
            self.offered), server_time="2026-11-01T12:00:00Z")
        if target != "/v1/info":
            self.sent.append(f"{method} {target}")
            answer = protocol.DepositResponse(version=1, created=True, fingerprint="ab")
            if target == "/v1/nonce":
                answer = protocol.NonceResponse(nonce=protocol.b64e(b"\0" * 32),
                                                expires_at="later")
        return Response(200, answer.model_dump_json().encode())


def enrolled(pin: str = "") -> AgentState:
    return AgentState(node_id="n" * 25, cluster_id="c" * 25,
                      deposit_key_sha256=pin)


UNLOCK_KEY = UnlockKey(bytes(range(32)))
AGENT_KEY = ec.generate_private_key(ec.SECP256R1())


def test_a_deposit_to_an_impersonators_key_sends_nothing_after_info() -> None:
    client = FakeEscrow(FAKE)
    state = enrolled(REAL_SHA)
    with pytest.raises(DepositKeyMismatch):
        asyncio.run(ensure_escrowed(client, state, AGENT_KEY, UNLOCK_KEY))
    assert client.sent == []
    assert state.escrowed == {}


def test_a_deposit_to_the_pinned_key_goes_out() -> None:
    client = FakeEscrow(REAL)
    state = enrolled(REAL_SHA)
    assert asyncio.run(ensure_escrowed(client, state, AGENT_KEY, UNLOCK_KEY)) == (1, True)
    assert client.sent == ["POST /v1/nonce", "POST /v1/deposit"]


def test_a_node_enrolled_before_pinning_pins_the_key_it_sees_next_and_keeps_it() -> None:
    state = enrolled()
    assert asyncio.run(pin_deposit_key(FakeEscrow(REAL), state, "")) is True
    assert state.deposit_key_sha256 == REAL_SHA
    assert asyncio.run(pin_deposit_key(FakeEscrow(FAKE), state, "")) is False
    assert state.deposit_key_sha256 == REAL_SHA
    with pytest.raises(DepositKeyMismatch):
        asyncio.run(ensure_escrowed(FakeEscrow(FAKE), state, AGENT_KEY, UNLOCK_KEY))


def test_a_configured_fingerprint_replaces_the_pin_before_a_deposit() -> None:
    state = enrolled(REAL_SHA)
    assert asyncio.run(pin_deposit_key(FakeEscrow(FAKE), state, FAKE_SHA)) is False
    assert state.deposit_key_sha256 == FAKE_SHA
    assert asyncio.run(ensure_escrowed(FakeEscrow(FAKE), state, AGENT_KEY,
                                       UNLOCK_KEY)) == (1, True)


def test_a_state_file_from_an_older_agent_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"node_id": "n", "cluster_id": "c", "escrow_url": "https://e", '
                    '"enrolled_at": "t", "escrowed": {}, "checked_kek_version": "", '
                    '"last_unlock": null}')
    assert agent_state.load(path).deposit_key_sha256 == ""
    saved = enrolled(REAL_SHA)
    agent_state.save(path, saved)
    assert agent_state.load(path).deposit_key_sha256 == REAL_SHA
