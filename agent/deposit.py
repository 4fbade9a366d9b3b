"""Making sure the escrow holds a given unlock key: shared by enroll, rotate and the daemon's
rotation watch."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from agent.client import EscrowClient
from agent.state import AgentState
from escrow.unlockkey import UnlockKey


async def ensure_escrowed(client: EscrowClient, state: AgentState,
                          agent_key: ec.EllipticCurvePrivateKey, key: UnlockKey, *,
                          confirm: bool = False) -> tuple[int, bool]:
    """(version, deposited now). Deposits a key the state does not list as escrowed, or any
    key when `confirm` asks the escrow itself; a deposit of a key the escrow already holds is
    harmless (it answers with the existing version)."""
    fingerprint = key.fingerprint(state.cluster_id)
    if fingerprint in state.escrowed and not confirm:
        return state.escrowed[fingerprint], False
    response = await client.deposit(state.cluster_id, state.node_id, agent_key, key)
    state.escrowed[fingerprint] = response.version
    return response.version, response.created
