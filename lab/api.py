"""An agent's calls to a test escrow, made with the agent's own client, one call per helper."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from typing import TypeVar

from agent.client import EscrowClient
from agent.release import candidate_keys
from escrow.core.unlockkey import UnlockKey
from lab.server import BOOT_ID, Cluster, EscrowProcess, Node

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def client(escrow: EscrowProcess) -> EscrowClient:
    return EscrowClient(escrow.url, escrow.ca)


async def enroll(escrow: EscrowProcess, node: Node) -> None:
    async with client(escrow) as c:
        await c.enroll(node.cluster_id, node.node_id, node.cert_pem, node.cert.key,
                       node.agent_key, node.hostname)


async def deposit(escrow: EscrowProcess, node: Node, key: UnlockKey) -> int:
    async with client(escrow) as c:
        return (await c.deposit(node.cluster_id, node.node_id, node.agent_key, key,
                                await c.deposit_key_sha256())).version


async def unseal(escrow: EscrowProcess, node: Node) -> list[tuple[int, UnlockKey]]:
    """Ask for shares as the node's agent would: the (version, key) pairs they rebuild."""
    async with client(escrow) as c:
        status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                           node.agent_key, node.hostname, BOOT_ID)
        return list(candidate_keys(status, ephemeral))


def enrolled(escrow: EscrowProcess, threshold: int = 2,
             slots: str = "auto,auto,alice,bob") -> tuple[Cluster, Node, UnlockKey]:
    """A cluster with one enrolled node that deposited a fresh key as version 1."""
    cluster = escrow.cluster(threshold, slots, "--allow-no-paper-recovery")
    node = cluster.node()
    key = UnlockKey(os.urandom(32))
    run(enroll(escrow, node))
    assert run(deposit(escrow, node, key)) == 1
    return cluster, node, key
