"""After a power cut every manager of a cluster asks at once: one custodian command approves
them all, each approval still bound to its own request, and the audit log says they went
together. Against a real `escrow serve` over TLS with a SoftHSM token."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydantic import TypeAdapter

from agent.release import candidate_keys
from escrow.core import protocol
from escrow.core.protocol import (
    BatchApproval,
    BatchApproveRequest,
    BatchApproveResponse,
    PendingRequest,
)
from escrow.core.states import Decision
from escrow.core.unlockkey import UnlockKey
from lab.api import client, enroll, enrolled, run
from lab.server import BOOT_ID, Cluster, EscrowProcess, Node, make_escrow
from tests.conftest import fails, ok

pytestmark = pytest.mark.slow
PENDING = TypeAdapter(list[PendingRequest])


@pytest.fixture(scope="module")
def escrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EscrowProcess]:
    server = make_escrow(tmp_path_factory.mktemp("server"))
    for name in ("alice", "bob", "carol"):
        server.custodian(name)
    server.start()
    yield server
    assert server.stop() == 0


def locked_cluster(escrow: EscrowProcess, managers: int
                   ) -> tuple[Cluster, list[Node], UnlockKey, dict[str, object]]:
    """A cluster (2 of auto, alice, bob) whose ``managers`` managers all asked for their
    shares at once, each waiting for one approval. Returns the nodes and each request's
    agent-side key by request id."""
    cluster, first, key = enrolled(escrow, 2, "auto,alice,bob")
    nodes = [first]
    for n in range(1, managers):
        node = cluster.node()
        node.hostname = f"manager-{n + 1}"
        run(enroll(escrow, node))
        nodes.append(node)
    waiting: dict[str, object] = {}

    async def power_on() -> None:
        async with client(escrow) as c:
            for node in nodes:
                status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                                   node.agent_key, node.hostname, BOOT_ID)
                assert (status.state, status.needed) == ("pending", 1)
                waiting[status.request_id] = ephemeral

    run(power_on())
    return cluster, nodes, key, waiting


def test_after_a_power_cut_one_command_approves_every_manager_each_bound_to_its_request(
        escrow: EscrowProcess) -> None:
    cluster, nodes, key, waiting = locked_cluster(escrow, 3)
    listed = ok(escrow.as_custodian("bob", "requests"))
    assert f"3 managers of {cluster.cluster_id} locked within 1 min" in listed
    assert f"escrow approve --cluster {cluster.cluster_id} --all" in listed

    approved = ok(escrow.as_custodian("bob", "approve", "--cluster", cluster.cluster_id,
                                      "--all", "--yes"))
    assert "3 approved, 0 refused" in approved
    for node in nodes:  # the confirmation showed each request's facts
        assert node.hostname in approved

    async def unlock() -> None:
        async with client(escrow) as c:
            for request_id, ephemeral in waiting.items():
                status = await c.poll(request_id)
                assert (status.state, status.approvals) == ("ready", ["bob"])
                assert list(candidate_keys(status, ephemeral)) == [(1, key)]  # type: ignore[arg-type]

    run(unlock())
    records = escrow.audit("custodian.approve", last=20)
    singles = [d for e, d in records
               if e == "custodian.approve" and d["request_id"] in waiting]
    [batch] = [d for e, d in records if e == "custodian.approve_batch"]
    assert {d["request_id"] for d in singles} == set(waiting)
    assert {(d["batch_id"], d["batch_size"]) for d in singles} == {(batch["batch_id"], 3)}
    assert sorted(batch["approved"]) == sorted(waiting)
    assert batch["refused"] == {}
    # Each approval's signature is over its own request's facts, as a single approval's is.
    assert len({d["signature"] for d in singles}) == 3
    # Nothing is left for bob to approve: a second run says so and approves nothing.
    fails(escrow.as_custodian("bob", "approve", "--cluster", cluster.cluster_id, "--all",
                              "--yes"), 1, "awaits your approval")


def test_a_batch_approves_what_it_may_and_names_each_refusal(escrow: EscrowProcess) -> None:
    cluster, _, _, waiting = locked_cluster(escrow, 3)
    other, _, _, elsewhere = locked_cluster(escrow, 1)
    alice = escrow.api_as("alice")
    views = {p.request_id: p for p in alice.call("GET", "/v1/requests",
                                                  PENDING) if p.request_id in waiting
             or p.request_id in elsewhere}
    good, decided, forged = sorted(waiting)
    [foreign] = elsewhere
    ok(escrow.as_custodian("alice", "approve", decided, "--yes"))

    def signed(request_id: str, over: PendingRequest | None = None) -> BatchApproval:
        return BatchApproval(request_id=request_id, signature=protocol.sign(
            alice.key, protocol.approval_payload(Decision.APPROVE, over or views[request_id])))

    answer = alice.call("POST", "/v1/requests/approve", BatchApproveResponse,
                        BatchApproveRequest(cluster_id=cluster.cluster_id, approvals=[
                            signed(good), signed(decided), signed(forged, views[good]),
                            signed(foreign), signed("r-" + "x" * 20, views[good])]))
    outcome = {r.request_id: (r.state, r.error) for r in answer.results}
    assert outcome == {good: ("ready", ""), decided: (None, "already_decided"),
                       forged: (None, "bad_signature"), foreign: (None, "other_cluster"),
                       "r-" + "x" * 20: (None, "unknown_request")}
    [*_, (_, batch)] = escrow.audit("custodian.approve_batch", last=20)
    assert batch["approved"] == [good]
    assert set(batch["refused"]) == {decided, forged, foreign, "r-" + "x" * 20}
    # The request of the other cluster and the forged one are still waiting.
    still = {p.request_id: p.approvals for p in alice.call("GET", "/v1/requests", PENDING)}
    assert still[forged] == still[foreign] == []
    assert other.cluster_id != cluster.cluster_id


def test_approve_needs_one_request_or_a_whole_cluster(escrow: EscrowProcess) -> None:
    fails(escrow.as_custodian("bob", "approve"), 2, "--cluster C --all")
    fails(escrow.as_custodian("bob", "approve", "--cluster", "c" * 25), 2, "--cluster C --all")
    fails(escrow.as_custodian("bob", "approve", "r-" + "a" * 20, "--cluster", "c" * 25,
                              "--all"), 2, "not both")


def test_a_custodian_without_a_slot_approves_nothing_in_bulk(escrow: EscrowProcess) -> None:
    cluster, _, _, waiting = locked_cluster(escrow, 2)
    fails(escrow.as_custodian("carol", "approve", "--cluster", cluster.cluster_id, "--all",
                              "--yes"), 1, "awaits your approval")
    # Signing bob's view of the requests gets carol no further.
    carol = escrow.api_as("carol")
    views = [p for p in escrow.api_as("bob").call("GET", "/v1/requests", PENDING)
             if p.request_id in waiting]
    answer = carol.call("POST", "/v1/requests/approve", BatchApproveResponse,
                        BatchApproveRequest(cluster_id=cluster.cluster_id, approvals=[
                            BatchApproval(request_id=p.request_id, signature=protocol.sign(
                                carol.key, protocol.approval_payload(Decision.APPROVE, p)))
                            for p in views]))
    assert [r.error for r in answer.results] == ["not_a_custodian"] * 2
    listed = json.loads(ok(escrow.as_custodian("bob", "requests", "--json")))
    assert all(r["approvals"] == [] for r in listed if r["request_id"] in waiting)
