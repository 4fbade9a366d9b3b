"""`unseal-agent enroll`: bind this manager to the escrow while it is unlocked, and make sure
the escrow holds its current unlock key."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from agent import keys
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.swarm_identity import read_signing_identity


@dataclass(frozen=True)
class Enrolled:
    cluster_id: str
    node_id: str
    deposited_version: int | None  # None: the escrow already held the current key


async def enroll(config: AgentConfig) -> Enrolled:
    docker = Docker(config.docker_host)
    swarm = docker.swarm()
    state = swarm.get("LocalNodeState")
    if state == "locked":
        raise AgentError("this manager is locked", "unlock it first (`docker swarm unlock`, or "
                         "`escrow recover` from paper shares), then enroll")
    if state != "active":
        raise AgentError(f"this node is not in a swarm (state {state!r})",
                         "enroll managers of a swarm: `docker swarm init --autolock` or join one")
    if not swarm.get("ControlAvailable"):
        raise AgentError("this node is a worker, not a manager",
                         "only managers are locked by autolock; run the agent on managers")
    if not docker.autolock():
        raise AgentError("autolock is off for this swarm: there is nothing to escrow",
                         "turn it on with `docker swarm update --autolock=true`, then enroll")
    key = docker.unlock_key()
    identity, swarm_key = read_signing_identity(config.docker_root, key)
    agent_key = keys.load_or_create(config.agent_key_path)
    async with EscrowClient(config.escrow_url, config.escrow_ca) as client:
        response = await client.enroll(identity.cluster_id, identity.node_id, identity.cert_pem,
                                       swarm_key, agent_key, socket.gethostname())
        del swarm_key
        version = None
        if key.fingerprint(identity.cluster_id) not in response.key_fingerprints:
            version = (await client.deposit(identity.cluster_id, identity.node_id, agent_key,
                                            key)).version
    return Enrolled(identity.cluster_id, identity.node_id, version)
