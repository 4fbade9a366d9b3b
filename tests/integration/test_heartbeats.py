"""Heartbeats and clone detection against a real escrow (TLS, SoftHSM, SQLite), with the
agent's own client: what `escrow node list` and /metrics say of a node, a copy of a manager
refused while the original beats, reboots never delayed past one interval, and a manager whose
dockerd restarts often never locked out by the rate limit."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.client import EscrowClient
from agent.errors import EscrowRejected
from agent.heartbeat import beat_request
from agent.release import candidate_keys
from agent.swarm_identity import NodeIdentity
from escrow.core.states import LockState
from lab.api import beat, client, enrolled, run
from lab.receiver import collector, receiving
from lab.server import EscrowProcess, Node, make_escrow

pytestmark = pytest.mark.slow

INTERVAL = 5


def boot() -> str:
    return str(uuid.uuid4())


async def ask(c: EscrowClient, node: Node, boot_id: str, wait: float = 0) -> tuple[str, int]:
    """Ask for shares from ``boot_id``, poll once with ``wait``: (state, keys rebuilt)."""
    status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, node.hostname, boot_id)
    if wait:
        status = await c.poll(status.request_id, wait)
    return status.state, len(list(candidate_keys(status, ephemeral)))


def nodes(escrow: EscrowProcess) -> dict[str, dict[str, Any]]:
    listed = escrow.cli("node", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {row["node_id"]: row for row in json.loads(listed.stdout)}


def test_a_beating_node_is_listed_and_counted_with_its_state_and_audited_only_on_change(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = enrolled(escrow, 1, "auto")
    here = boot()

    async def scenario() -> None:
        async with client(escrow) as c:
            for _ in range(3):
                await beat(c, node, here)
            await beat(c, node, here, lock=LockState.LOCKED)

    run(scenario())
    row = nodes(escrow)[node.node_id]
    assert (row["liveness"], row["boot_id"], row["status"]) == ("locked", here, "active")
    assert escrow.metric("escrow_nodes", cluster=cluster.cluster_id, state="locked") == 1
    changes = [d["lock_state"] for e, d in escrow.audit("node.heartbeat")]
    assert changes == ["unlocked", "locked"]


def test_a_replayed_or_forged_heartbeat_is_refused_and_writes_nothing(
        escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 1, "auto")
    stranger = Node(node.cluster_id, node.node_id, node.cert)  # another agent key
    audit_before = len(escrow.audit())

    async def scenario() -> list[int]:
        statuses: list[int] = []
        async with client(escrow) as c:
            nonce, pinned = await c.nonce(), await c.deposit_key_sha256()
            identity = NodeIdentity(node.node_id, node.cluster_id, "swarm-manager",
                                    node.cert_pem, "")
            signed = beat_request(identity, LockState.UNLOCKED, nonce, boot=boot(), uptime=1,
                                  interval=INTERVAL, goodbye=False, agent_key=node.agent_key)
            await c.heartbeat(lambda _: signed, pinned)
            with pytest.raises(EscrowRejected) as replayed:
                await c.heartbeat(lambda _: signed, pinned)
            with pytest.raises(EscrowRejected) as forged:
                await beat(c, stranger, boot())
            statuses += [replayed.value.status, forged.value.status]
        return statuses

    assert run(scenario()) == [401, 401]
    assert [e for e, _ in escrow.audit()[audit_before:]] == ["node.heartbeat"]


def test_a_copy_asking_while_the_original_beats_is_refused_and_the_node_quarantined(
        tmp_path: Path) -> None:
    received: list[dict[str, object]] = []
    original, copy = boot(), boot()

    async def scenario() -> tuple[Any, ...]:
        async with receiving("/hook", collector(received)) as url:
            escrow = make_escrow(tmp_path)
            escrow.webhook("hook", url, ["clone_suspected"])
            try:
                await asyncio.to_thread(escrow.start)
                _, node, _ = await asyncio.to_thread(enrolled, escrow, 1, "auto")
                async with client(escrow) as c:
                    await beat(c, node, original)
                    status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, copy)
                    held = (status.state, len(status.releases))
                    await beat(c, node, original)  # the original is alive: the asker is a copy
                    after = (await c.poll(status.request_id)).state
                    with pytest.raises(EscrowRejected) as again:
                        await ask(c, node, copy)
                    with pytest.raises(EscrowRejected) as original_asks:
                        await ask(c, node, original)
                    for _ in range(50):
                        if received:
                            break
                        await asyncio.sleep(0.1)
                    listed = await asyncio.to_thread(nodes, escrow)
                    audit = await asyncio.to_thread(escrow.audit, "node.clone_suspected")
                    allowed = await asyncio.to_thread(escrow.cli, "node", "allow", "--cluster",
                                                      node.cluster_id, node.node_id)
                    assert allowed.returncode == 0, allowed.stderr
                    await beat(c, node, original)
                    readmitted = await ask(c, node, original)
                    return (held, after, again.value, original_asks.value,
                            listed[node.node_id]["status"], audit, readmitted)
            finally:
                await asyncio.to_thread(escrow.stop)

    held, after, again, original_asks, status, audit, readmitted = run(scenario())
    assert held == ("pending", 0)
    assert after == "revoked"
    assert (again.status, again.reason) == (409, "clone_suspected")
    assert original_asks.reason == "clone_suspected"  # nothing to either boot until an admin
    assert status == "quarantined"
    [(_, details)] = audit
    assert details["boot_id"] == original
    assert [s["boot_id"] for s in details["alongside"]] == [copy]
    assert all(s["source"] for s in details["alongside"])
    assert [(r["event"], r["alert"], r["node_id"]) for r in received] == [
        ("clone_suspected", "node.clone_suspected", details["node_id"])]
    assert readmitted == ("ready", 1)


def test_a_reboot_that_said_goodbye_is_not_delayed(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 1, "auto")
    before, after = boot(), boot()

    async def scenario() -> tuple[str, int]:
        async with client(escrow) as c:
            await beat(c, node, before)
            await beat(c, node, before, goodbye=True)
            return await ask(c, node, after)

    assert run(scenario()) == ("ready", 1)


def test_an_unclean_reboot_waits_one_interval_then_unlocks(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 1, "auto")
    crashed, rebooted = boot(), boot()

    async def scenario() -> tuple[tuple[str, int], tuple[str, int], float]:
        async with client(escrow) as c:
            await beat(c, node, crashed)  # then the machine dies: no goodbye
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, rebooted)
            first = (status.state, len(status.releases))
            started = time.monotonic()
            status = await c.poll(status.request_id, wait=30)  # answers when the hold ends
            waited = time.monotonic() - started
            return first, (status.state, len(list(candidate_keys(status, ephemeral)))), waited

    first, then, waited = run(scenario())
    assert first == ("pending", 0)
    assert then == ("ready", 1)
    assert waited <= INTERVAL + 1, f"the hold lasted {waited:.1f} s"


def test_two_boots_beating_at_once_quarantine_the_node(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 1, "auto")
    one, other = boot(), boot()

    async def scenario() -> None:
        async with client(escrow) as c:
            await beat(c, node, one)
            await beat(c, node, other)  # a new boot: could be a reboot after a crash
            await beat(c, node, one)  # the first is alive too: two machines, one identity

    run(scenario())
    assert nodes(escrow)[node.node_id]["status"] == "quarantined"
    [(_, details)] = escrow.audit("node.clone_suspected")
    assert (details["boot_id"], details["alongside"][0]["boot_id"]) == (one, other)


def test_restarts_that_unlock_are_never_limited_but_asking_without_unlocking_is(
        tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path, ESCROW_REQUESTS_RATE_LIMIT="3")
    escrow.start()
    try:
        _, node, _ = enrolled(escrow, 1, "auto")

        async def scenario() -> int:
            async with client(escrow) as c:
                for _ in range(12):  # a dockerd restarting over and over, unlocked each time
                    status, ephemeral = await c.unseal(node.cluster_id, node.node_id,
                                                       node.cert_pem, node.agent_key,
                                                       node.hostname, boot())
                    [(version, _)] = candidate_keys(status, ephemeral)
                    await c.report(status.request_id, node.node_id, node.agent_key,
                                   "unlocked", version)
                for _ in range(3):  # asking without ever unlocking
                    await ask(c, node, boot())
                with pytest.raises(EscrowRejected) as caught:
                    await ask(c, node, boot())
                return caught.value.status

        assert run(scenario()) == 429
    finally:
        escrow.stop()
