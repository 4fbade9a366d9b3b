"""Many agents unsealing through two escrow replicas while something happens to one of them:
the drills of tests/integration/test_replicas.py and bench/replica_loss.py."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.client import EscrowClient
from agent.errors import EscrowUnavailable
from agent.release import candidate_keys
from escrow.core.unlockkey import UnlockKey
from lab.server import BOOT_ID, EscrowProcess, Node

SPREAD = 2.0  # seconds over which the agents start
DISRUPT_AT = 1.0  # seconds after the first start
RETRY = 1.0  # agent/backoff.py's first delay


@dataclass
class Storm:
    done: dict[int, list[tuple[int, UnlockKey]]] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # first attempt to unlocked
    met: dict[int, list[str]] = field(default_factory=dict)  # what each agent was refused
    started: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # mid-flow at the disruption


async def run(nodes: list[Node], replicas: list[EscrowProcess], ca: Path,
                disrupt: Callable[[], None]) -> Storm:
    """Every node unseals as its agent would (retrying after the agent's first back-off),
    half of them preferring each replica; ``disrupt`` runs a second in."""
    storm = Storm()

    async def agent(index: int, node: Node) -> None:
        await asyncio.sleep(index * SPREAD / len(nodes))
        urls = [r.url for r in (replicas if index % 2 == 0 else replicas[::-1])]
        storm.started.add(index)
        started = time.monotonic()
        while True:
            try:
                async with EscrowClient(urls, ca) as client:
                    status, ephemeral = await client.unseal(
                        node.cluster_id, node.node_id, node.cert_pem, node.agent_key,
                        node.hostname, BOOT_ID)
                    while status.state == "pending":
                        status = await client.poll(status.request_id, wait=5)
                    keys = list(candidate_keys(status, ephemeral))
                    await client.report(status.request_id, node.node_id, node.agent_key,
                                        "unlocked", 1)
            except EscrowUnavailable as exc:
                storm.met.setdefault(index, []).append(exc.message)
                await asyncio.sleep(RETRY)
                continue
            storm.done[index] = keys
            storm.seconds[index] = time.monotonic() - started
            return

    async def disruption() -> None:
        await asyncio.sleep(DISRUPT_AT)
        storm.in_flight = storm.started - storm.done.keys()
        await asyncio.to_thread(disrupt)

    try:
        await asyncio.wait_for(asyncio.gather(
            disruption(), *(agent(i, node) for i, node in enumerate(nodes))), timeout=120)
    except TimeoutError:
        raise AssertionError(f"{len(nodes) - len(storm.done)} agents never unsealed; some "
                             f"refusals: {list(storm.met.values())[:3]}") from None
    return storm


@dataclass(frozen=True)
class Fleet:
    nodes: list[Node]  # enrolled, in one cluster (auto, auto)
    key: UnlockKey  # its deposited version 1
    ca: Path  # every replica's CA, in one file, as agents of several replicas trust them


def fleet(replicas: list[EscrowProcess], agents: int, directory: Path) -> Fleet:
    """``agents`` nodes of one cluster, enrolled through the last replica, with a key
    deposited through the first."""
    first = replicas[0]
    cluster = first.cluster(2, "auto,auto", "--allow-no-paper-recovery")
    nodes = [cluster.node() for _ in range(agents)]
    key = UnlockKey(os.urandom(32))
    asyncio.run(_enroll(first, replicas[-1], nodes, key))
    ca = directory / "escrow-ca.pem"
    ca.write_text("".join(r.ca.read_text() for r in replicas))
    return Fleet(nodes, key, ca)


async def _enroll(first: EscrowProcess, last: EscrowProcess, nodes: list[Node],
                  key: UnlockKey) -> None:
    async with EscrowClient(last.url, last.ca) as client:
        for node in nodes:
            await client.enroll(node.cluster_id, node.node_id, node.cert_pem, node.cert.key,
                                node.agent_key, node.hostname)
    async with EscrowClient(first.url, first.ca) as client:
        await client.deposit(nodes[0].cluster_id, nodes[0].node_id, nodes[0].agent_key, key,
                             await client.deposit_key_sha256())
