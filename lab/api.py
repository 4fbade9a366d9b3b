"""An agent's calls to a test escrow, made with the agent's own client, one call per helper."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from agent.client import EscrowClient
from agent.heartbeat import beat_request
from agent.release import candidate_keys
from agent.swarm_identity import NodeIdentity
from escrow.core.states import LockState
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


async def beat(c: EscrowClient, node: Node, boot_id: str, *,
               lock: LockState = LockState.UNLOCKED, goodbye: bool = False,
               interval: int = 5, kek_version: str = "") -> None:
    """One heartbeat of ``node`` from ``boot_id``, as its agent sends it."""
    identity = NodeIdentity(node.node_id, node.cluster_id, "swarm-manager", node.cert_pem,
                            kek_version)
    await c.heartbeat(lambda nonce: beat_request(
        identity, lock, nonce, boot=boot_id, uptime=60, interval=interval, goodbye=goodbye,
        agent_key=node.agent_key), await c.deposit_key_sha256())


def waiting_manager(escrow: EscrowProcess, kek_version: str = "") -> tuple[str, str]:
    """A cluster (3 of auto, alice, bob: the escrow's custodians) whose manager-2 is locked,
    beats with ``kek_version`` and asks for its shares, approved by alice and waiting for one
    more; manager-1 is unlocked. Returns (request id, manager-2's node id)."""
    cluster, unlocked, _ = enrolled(escrow, threshold=3, slots="auto,alice,bob")
    locked = cluster.node()
    locked.hostname = "manager-2"
    run(enroll(escrow, locked))

    async def act() -> str:
        async with client(escrow) as c:
            await beat(c, unlocked, str(uuid.uuid4()))
            await beat(c, locked, BOOT_ID, lock=LockState.LOCKED, kek_version=kek_version)
            status, _ = await c.unseal(locked.cluster_id, locked.node_id, locked.cert_pem,
                                       locked.agent_key, locked.hostname, BOOT_ID)
            return status.request_id
    request_id = run(act())
    approved = escrow.as_custodian("alice", "approve", request_id, "--yes")
    assert approved.returncode == 0, approved.stderr
    return request_id, locked.node_id
