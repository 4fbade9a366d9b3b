"""`unseal-agent enroll`: bind this manager to the escrow while it is unlocked, and make sure
the escrow holds its current unlock key."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from agent import keys
from agent import state as agent_state
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.deposit import ensure_escrowed
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.state import AgentState
from agent.swarm_identity import read_signing_identity


@dataclass(frozen=True)
class Enrolled:
    cluster_id: str
    node_id: str
    version: int  # of the current unlock key in the escrow
    deposited: bool  # False: the escrow already held it


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
        response = await client.enroll(identity.cluster_id, identity.node_id, identity.cert_pem,
                                       swarm_key, agent_key, socket.gethostname())
        del swarm_key
        state = AgentState(
            node_id=identity.node_id, cluster_id=identity.cluster_id,
            escrow_url=config.escrow_url, enrolled_at=response.enrolled_at,
            escrowed={k.fingerprint: k.version for k in response.keys},
            checked_kek_version=identity.kek_version,
            last_unlock=previous.last_unlock if previous.knows(identity.node_id,
                                                               identity.cluster_id) else None)
        version, deposited = await ensure_escrowed(client, state, agent_key, key)
    agent_state.save(config.state_path, state)
    return Enrolled(identity.cluster_id, identity.node_id, version, deposited)
