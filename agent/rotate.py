"""`unseal-agent rotate`: rotate the swarm's unlock key and escrow the new one, in one step.

Order matters: the escrow must be healthy and hold the current key before anything changes,
because after the rotation a manager that was down needs the old key and every manager that
restarts needs the new one. If the new key cannot be escrowed the command fails loudly (exit
1, journal priority crit); the running agent keeps trying to deposit it. An escrow that offers
a deposit key other than the pinned one (agent/deposit_key.py) gets nothing, and nothing is
rotated.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from agent import state as agent_state
from agent.backoff import Backoff
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.deposit import ensure_escrowed, pin_deposit_key
from agent.docker_state import Docker
from agent.errors import AgentError, DepositKeyMismatch, EscrowRejected, EscrowUnavailable
from agent.state import AgentState
from agent.swarm_identity import read_identity
from escrow.core.unlockkey import UnlockKey


@dataclass(frozen=True)
class Rotated:
    cluster_id: str
    old_version: int
    new_version: int


async def rotate(config: AgentConfig, log: logging.Logger, attempts: int = 6,
                 first_retry: float = 2.0) -> Rotated:
    docker = Docker(config.docker_host)
    docker.require_autolocked_manager()
    identity = read_identity(config.docker_root)
    agent_key = keys.load(config)
    state = agent_state.load(config.state_path)
    if not state.knows(identity.node_id, identity.cluster_id):
        raise AgentError(f"node {identity.node_id} is not enrolled with the escrow",
                         "run `unseal-agent enroll` first; nothing was rotated")
    fields = {"NODE_ID": identity.node_id, "CLUSTER_ID": identity.cluster_id}
    async with EscrowClient(config.escrow_url, config.escrow_ca) as client:
        try:
            await client.health()
            if await pin_deposit_key(client, state, config.escrow_deposit_key_sha256):
                log.warning("pinned the escrow's deposit key sha256 %s on first use (this node "
                            "was enrolled before agents pinned it)", state.deposit_key_sha256,
                            extra=fields)
            old_version, _ = await ensure_escrowed(client, state, agent_key,
                                                   docker.unlock_key(), confirm=True)
        except (EscrowUnavailable, EscrowRejected) as exc:
            raise AgentError(f"{exc.message}; the unlock key was NOT rotated",
                             "fix the escrow first, then rotate again") from None
        except DepositKeyMismatch as exc:
            exc.message += "; the unlock key was NOT rotated"
            log.critical("%s", exc.message, extra=fields)
            raise
        agent_state.save(config.state_path, state)
        new_key = docker.rotate_unlock_key()
        log.info("rotated the unlock key of cluster %s (the escrow holds the old one as "
                 "version %d); escrowing the new one", identity.cluster_id, old_version,
                 extra=fields)
        new_version = await _escrow_new_key(client, state, agent_key, new_key, log, fields,
                                            attempts, first_retry)
        del new_key
        agent_state.save(config.state_path, state)
    log.info("the escrow holds the new unlock key as version %d", new_version, extra=fields)
    return Rotated(identity.cluster_id, old_version, new_version)


async def _escrow_new_key(client: EscrowClient, state: AgentState,
                          agent_key: ec.EllipticCurvePrivateKey, key: UnlockKey,
                          log: logging.Logger, fields: dict[str, str], attempts: int,
                          first_retry: float) -> int:
    backoff = Backoff(first=first_retry, cap=30.0)
    failure: AgentError = AgentError("no attempt was made")
    for attempt in range(1, attempts + 1):
        try:
            version, _ = await ensure_escrowed(client, state, agent_key, key)
        except (EscrowRejected, DepositKeyMismatch) as exc:
            failure = exc
            break
        except EscrowUnavailable as exc:
            failure = exc
            if attempt < attempts:
                delay = backoff.next_delay()
                log.warning("deposit of the new unlock key failed (%s); attempt %d of %d in "
                            "%.0f s", exc.message, attempt + 1, attempts, delay, extra=fields)
                await asyncio.sleep(delay)
        else:
            return version
    log.critical("the unlock key was rotated but the new key is NOT escrowed: %s. Until it "
                 "is, a manager that restarts stays locked; the running agent keeps trying to "
                 "deposit it", failure.message, extra=fields)
    raise AgentError(f"the unlock key was rotated but the new key is NOT escrowed "
                     f"({failure.message})",
                     "bring the escrow back: the running unseal-agent deposits the new key by "
                     "itself within key_check_seconds; check with `escrow key list`")
