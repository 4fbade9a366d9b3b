"""Drill: a serving escrow SIGKILLed 30 times at random moments while agents enroll, deposit
and unseal over TLS.

Every acknowledged enrollment and deposit survives, no key version is half-written, the audit
chain verifies, and a request left waiting for an approval completes after the restarts.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import AgentError
from agent.release import candidate_keys
from escrow.core.unlockkey import UnlockKey
from lab.api import client, deposit, enroll, run, unseal
from lab.server import BOOT_ID, Cluster, EscrowProcess, Node, make_escrow

pytestmark = pytest.mark.slow
KILLS = 30


@dataclass
class Acknowledged:
    nodes: list[Node] = field(default_factory=list)
    keys: dict[int, UnlockKey] = field(default_factory=dict)  # version -> key
    unseals: int = 0
    problems: list[str] = field(default_factory=list)  # from the worker thread


def workload(escrow: EscrowProcess, cluster: Cluster, seen: Acknowledged,
             stop: threading.Event) -> None:
    """Enroll, deposit and unseal in a loop; record only what the escrow acknowledged."""
    while not stop.is_set():
        node = cluster.node()
        key = UnlockKey(os.urandom(32))
        try:
            run(enroll(escrow, node))
            seen.nodes.append(node)
            seen.keys[run(deposit(escrow, node, key))] = key
            newest = run(unseal(escrow, node))[0]
        except AgentError:
            return  # the escrow died under the request
        except Exception as exc:  # a failure in this thread must reach the test
            seen.problems.append(repr(exc))
            return
        if newest[1] != key:
            seen.problems.append(f"unseal rebuilt version {newest[0]}, not the key just stored")
        seen.unseals += 1


def shares_per_version(escrow: EscrowProcess, cluster_id: str) -> dict[int, int]:
    with sqlite3.connect(escrow.data_dir / "escrow.db") as db:
        return dict(db.execute(
            "SELECT v.version, COUNT(s.slot) FROM key_versions v LEFT JOIN shares s "
            "USING (cluster_id, version) WHERE v.cluster_id = ? GROUP BY v.version",
            (cluster_id,)))


def kill_repeatedly(escrow: EscrowProcess, cluster: Cluster, rng: random.Random
                    ) -> tuple[Acknowledged, list[float]]:
    """KILLS rounds of: load, SIGKILL at a random instant, restart. Returns what was
    acknowledged and each restart's seconds until healthy."""
    seen = Acknowledged()
    downtime: list[float] = []
    for _ in range(KILLS):
        stop = threading.Event()
        worker = threading.Thread(target=workload, args=(escrow, cluster, seen, stop))
        worker.start()
        time.sleep(rng.uniform(0.05, 0.6))
        assert escrow.process is not None
        escrow.process.kill()  # SIGKILL, mid-request most of the time
        escrow.process.wait()
        escrow.process = None
        stop.set()
        worker.join(timeout=60)
        assert not worker.is_alive()
        started = time.monotonic()
        escrow.start()
        downtime.append(time.monotonic() - started)
    return seen, downtime


def test_an_escrow_killed_30_times_while_serving_loses_nothing_it_acknowledged(
        tmp_path: Path) -> None:
    # Every enrolled node deposits a key of its own: hundreds of versions in one cluster.
    escrow = make_escrow(tmp_path / "escrow", ESCROW_KEYS_MAX_VERSIONS="100000")
    escrow.custodian("alice")
    escrow.custodian("bob")
    cluster = escrow.cluster(2, "auto,auto,alice,bob")
    gated = escrow.cluster(2, "auto,alice,bob")
    escrow.start()
    first = gated.node()
    run(enroll(escrow, first))
    gated_key = UnlockKey(os.urandom(32))
    assert run(deposit(escrow, first, gated_key)) == 1

    async def ask() -> tuple[str, X25519PrivateKey]:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(first.cluster_id, first.node_id, first.cert_pem,
                                               first.agent_key, first.hostname, BOOT_ID)
            return status.request_id, ephemeral

    pending_id, pending_key = run(ask())

    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    try:
        seen, downtime = kill_repeatedly(escrow, cluster, rng)
        assert seen.problems == []
        assert len(seen.keys) >= KILLS // 2, "the kills came too early to test anything"
        # Every acknowledged enrollment can still unseal, and every acknowledged deposit is
        # whole: its version rebuilds the very key that was deposited.
        rebuilt = dict(run(unseal(escrow, seen.nodes[-1])))
        assert {v: rebuilt[v] for v in seen.keys} == seen.keys
        for node in rng.sample(seen.nodes, 5):
            assert run(unseal(escrow, node))
        counts = shares_per_version(escrow, cluster.cluster_id)
        assert set(counts.values()) == {4}, f"half-written versions: {counts}"
        assert max(counts) == len(counts)  # versions 1..n, none skipped or lost

        # The request that waited for a custodian through all the kills completes.
        approved = escrow.as_custodian("alice", "approve", pending_id, "--yes")
        assert approved.returncode == 0, approved.stderr

        async def collect() -> list[tuple[int, UnlockKey]]:
            async with client(escrow) as c:
                status = await c.poll(pending_id)
                assert status.state == "ready"
                return list(candidate_keys(status, pending_key))

        assert run(collect()) == [(1, gated_key)]
    finally:
        escrow.stop()
    verified = escrow.cli("audit", "verify")
    assert verified.returncode == 0, verified.stderr
    print(f"\n{KILLS} kills: {len(seen.nodes)} enrollments, {len(seen.keys)} deposits and "
          f"{seen.unseals} unseals acknowledged; restart to healthy "
          f"{min(downtime):.2f}-{max(downtime):.2f} s")
