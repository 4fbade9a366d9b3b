"""`unseal-agent status`: what this manager, its agent and the escrow look like from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent import deposit_key, keys
from agent import state as agent_state
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.docker_state import Docker
from agent.errors import AgentError
from agent.state import LastUnlock
from agent.swarm_identity import read_identity
from escrow.core.errors import EscrowError
from escrow.core.plaintext import plain
from escrow.core.timestamps import parse_timestamp

CLOCK_WARNING_SECONDS = 60


@dataclass
class Status:
    node_id: str = ""
    cluster_id: str = ""
    role: str = ""
    kek_version: str = ""
    lock_state: str = "unknown"  # locked, active, inactive, ... or "docker unreachable"
    enrolled: bool = False
    enrolled_at: str = ""
    escrow_url: str = ""  # the URL that answered; the first one while none did
    escrow_urls: list[str] = field(default_factory=list)  # every one, in order of preference
    escrow_reachable: bool = False
    clock_offset_seconds: float | None = None  # the escrow's clock minus this host's
    escrowed_versions: list[int] = field(default_factory=list)
    last_unlock: LastUnlock | None = None
    problems: list[str] = field(default_factory=list)


def _problem(exc: AgentError | EscrowError) -> str:
    return plain(exc.message + (f" ({exc.hint})" if exc.hint else ""))


async def gather(config: AgentConfig) -> Status:
    status = Status(escrow_url=config.escrow_url[0], escrow_urls=list(config.escrow_url))
    try:
        identity = read_identity(config.docker_root)
        status.node_id, status.cluster_id = identity.node_id, identity.cluster_id
        status.role, status.kek_version = identity.role, identity.kek_version
    except AgentError as exc:
        status.problems.append(_problem(exc))
    try:
        status.lock_state = plain(Docker(config.docker_host, timeout=10).swarm().get(
            "LocalNodeState", "unknown"))
    except AgentError as exc:
        status.lock_state = "docker unreachable"
        status.problems.append(_problem(exc))
    pinned = ""
    try:
        saved = agent_state.load(config.state_path)
        pinned = saved.deposit_key_sha256
        keys.load(config)
        status.enrolled = saved.knows(status.node_id, status.cluster_id) and bool(
            status.node_id)
        if not status.enrolled:
            status.problems.append("this node is not enrolled: run `unseal-agent enroll`")
        status.enrolled_at = saved.enrolled_at
        status.escrowed_versions = saved.versions()
        status.last_unlock = saved.last_unlock
    except EscrowError as exc:
        status.problems.append(_problem(exc))
    try:
        async with EscrowClient(config.escrow_url, config.escrow_ca, timeout=10) as client:
            await client.health()
            asked = datetime.now(UTC)
            info = await client.info()
            answered = client.url  # calls start where the last one was answered
        status.escrow_url, status.escrow_reachable = answered, True
        # Rounded to the second the escrow's timestamps carry; half the round trip is noise.
        status.clock_offset_seconds = round(
            (parse_timestamp(info.server_time) - asked).total_seconds())
        if abs(status.clock_offset_seconds) > CLOCK_WARNING_SECONDS:
            status.problems.append(
                f"the escrow's clock is {abs(status.clock_offset_seconds):.0f} s "
                f"{'ahead of' if status.clock_offset_seconds > 0 else 'behind'} this host's "
                "(synchronise both with NTP: certificates allow an hour, custodian signatures "
                "5 minutes)")
        # The key deposits would go to: a different one is the sign of an impersonator.
        deposit_key.pin_for(answered, deposit_key.offered_key(answered, info.deposit_public_key),
                            configured=config.escrow_deposit_key_sha256, pinned=pinned)
    except EscrowError as exc:
        status.problems.append(_problem(exc))
    return status
