"""Making sure the escrow holds a given unlock key: shared by enroll, rotate and the daemon's
rotation watch."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from agent import deposit_key
from agent.client import EscrowClient
from agent.state import AgentState
from escrow.core.unlockkey import UnlockKey


async def pin_deposit_key(client: EscrowClient, state: AgentState, configured: str) -> bool:
    """Make ``state`` pin a deposit key before a deposit: escrow_deposit_key_sha256
    (``configured``) wins; otherwise the pin recorded at enrollment stays. True if the key the
    escrow offers was pinned just now (trust on first use), for the caller to log and save.

    A node enrolled before agents pinned the deposit key has a state.json without a pin. It is
    pinned to the key the escrow offers now (trust on first use, as at enrollment) rather than
    refusing until someone re-enrolls every manager: refusing would leave a rotated key
    unescrowed, and the manager locked after its next restart, for no gain over pinning the
    escrow that this node has been talking to all along."""
    if configured:
        state.deposit_key_sha256 = configured
        return False
    if state.deposit_key_sha256:
        return False
    offer = await client.offer()
    state.deposit_key_sha256 = deposit_key.pin_for(offer.url, offer.key)
    return True


async def ensure_escrowed(client: EscrowClient, state: AgentState,
                          agent_key: ec.EllipticCurvePrivateKey, key: UnlockKey, *,
                          confirm: bool = False) -> tuple[int, bool]:
    """(version, deposited now). Deposits a key the state does not list as escrowed, or any
    key when `confirm` asks the escrow itself; a deposit of a key the escrow already holds is
    harmless (it answers with the existing version). Only to the deposit key ``state`` pins
    (see pin_deposit_key): any other is refused with DepositKeyMismatch."""
    fingerprint = key.fingerprint(state.cluster_id)
    if fingerprint in state.escrowed and not confirm:
        return state.escrowed[fingerprint], False
    response = await client.deposit(state.cluster_id, state.node_id, agent_key, key,
                                    state.deposit_key_sha256)
    state.escrowed[fingerprint] = response.version
    return response.version, response.created
