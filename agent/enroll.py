"""`unseal-agent enroll`: bind this manager to the escrow while it is unlocked, and make sure
the escrow holds its current unlock key.

Before anything else it pins the escrow's deposit key (agent/deposit_key.py): the one
escrow_deposit_key_sha256 names, else the one pinned by an earlier enrollment, else (trust on
first use) the one the escrow offers now. A different key offered is refused before the
enrollment is sent: re-enrolling must not be a way round the pin, so a legitimately new
deposit key is accepted only when its fingerprint is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import deposit_key, keys
from agent import state as agent_state
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.deposit import ensure_escrowed
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.host import hostname
from agent.state import AgentState
from agent.swarm_identity import read_signing_identity


@dataclass(frozen=True)
class Enrolled:
    cluster_id: str
    node_id: str
    version: int  # of the current unlock key in the escrow
    deposited: bool  # False: the escrow already held it
    deposit_key_sha256: str  # the escrow's deposit key, pinned
    pinned_now: bool  # True: trusted on first use (no pin configured or recorded before)


async def enroll(config: AgentConfig) -> Enrolled:
    docker = Docker(config.docker_host)
    docker.require_autolocked_manager()
    key = docker.unlock_key()
    identity, swarm_key = read_signing_identity(config.docker_root, key)
    agent_key = keys.load_or_create(config)
    try:
        previous = agent_state.load(config.state_path)
    except AgentError:
        previous = AgentState()  # enrolling writes a fresh one
    async with EscrowClient(config.escrow_url, config.escrow_ca) as client:
        offer = await client.offer()
        pin = deposit_key.pin_for(offer.url, offer.key,
                                  configured=config.escrow_deposit_key_sha256,
                                  pinned=previous.deposit_key_sha256)
        response = await client.enroll(identity.cluster_id, identity.node_id, identity.cert_pem,
                                       swarm_key, agent_key, hostname())
        del swarm_key
        state = AgentState(
            node_id=identity.node_id, cluster_id=identity.cluster_id,
            enrolled_at=response.enrolled_at,
            escrowed={k.fingerprint: k.version for k in response.keys},
            checked_kek_version=identity.kek_version,
            last_unlock=previous.last_unlock if previous.knows(identity.node_id,
                                                               identity.cluster_id) else None,
            deposit_key_sha256=pin)
        version, deposited = await ensure_escrowed(client, state, agent_key, key)
    agent_state.save(config.state_path, state)
    return Enrolled(identity.cluster_id, identity.node_id, version, deposited, pin,
                    not (config.escrow_deposit_key_sha256 or previous.deposit_key_sha256))
