"""Maintenance windows and the deny window against a real `escrow serve` (SoftHSM, TLS on
loopback) and managers played by the agent's own client: custodians use the real CLI, and a
forger the API with a custodian's key. One escrow serves the module; its clock is libfaketime's,
moved forward once (70 s, within the custodians' 5 min clock skew) by the tests at the end,
which need a deadline passed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.release import candidate_keys
from escrow.audit import AuditEvent
from escrow.core import protocol
from escrow.core.errors import Conflict, IdentityError, NotFound, WindowTaken
from escrow.core.protocol import RequestStatus, WindowOpenRequest, WindowSignRequest, WindowView
from escrow.core.states import Decision, RequestState
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.core.unlockkey import UnlockKey
from escrow.policy import Policy
from escrow.store import ApprovalRecord, ClusterRecord, RequestRecord, WindowClaim, WindowRecord
from escrow.store.sql import SqlStore
from lab import faketime
from lab.api import client, enroll, enrolled, run
from lab.server import BOOT_ID, Cluster, EscrowProcess, Node, make_escrow
from tests.conftest import Backend

pytestmark = pytest.mark.slow
JUMP_SECONDS = 70  # past a deny window of 1 min; within the custodians' clock skew (5 min)
_OPENED = re.compile(r"opened (w-[a-z0-9]{20}) ")


@pytest.fixture(scope="module")
def escrow_clock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The escrow's clock offset (libfaketime re-reads it at every call)."""
    path = tmp_path_factory.mktemp("clock") / "offset"
    path.write_text("+0\n")
    return path


@pytest.fixture(scope="module")
def escrow(tmp_path_factory: pytest.TempPathFactory,
           escrow_clock: Path) -> Iterator[EscrowProcess]:
    server = make_escrow(tmp_path_factory.mktemp("windows"), **faketime.following(escrow_clock))
    for name in ("alice", "bob", "carol", "dave"):  # dave holds no slot anywhere
        server.custodian(name)
    server.start()
    yield server
    assert server.stop() == 0


def ok(result: Any) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return str(result.stdout)


def open_window(escrow: EscrowProcess, by: str, cluster: Cluster, nodes: list[Node],
                *extra: str, restarts: int = 1, duration: str = "2h") -> str:
    """`escrow window open` as ``by``; the window's id."""
    out = ok(escrow.as_custodian(
        by, "window", "open", "--cluster", cluster.cluster_id,
        *[arg for node in nodes for arg in ("--node", node.node_id)],
        "--restarts", str(restarts), "--for", duration, "--reason",
        "kernel 6.18 patch night", "--yes", *extra))
    found = _OPENED.search(out)
    assert found, out
    return found.group(1)


def listed(escrow: EscrowProcess, by: str, window_id: str) -> dict[str, Any]:
    shown = json.loads(ok(escrow.as_custodian(by, "window", "list", "--json")))
    [window] = [w for w in shown if w["window_id"] == window_id]
    return dict(window)


def ask(escrow: EscrowProcess, node: Node) -> tuple[RequestStatus, X25519PrivateKey]:
    """A locked manager's request: its status and the key its shares are encrypted to."""
    async def asking() -> tuple[RequestStatus, X25519PrivateKey]:
        async with client(escrow) as c:
            return await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                  node.agent_key, node.hostname, BOOT_ID)
    return run(asking())


def unseal(escrow: EscrowProcess, node: Node
           ) -> tuple[RequestStatus, list[tuple[int, UnlockKey]]]:
    """A locked manager's request: its status and the keys its shares rebuild."""
    status, ephemeral = ask(escrow, node)
    return status, list(candidate_keys(status, ephemeral))


def poll(escrow: EscrowProcess, request_id: str) -> RequestStatus:
    async def ask() -> RequestStatus:
        async with client(escrow) as c:
            return await c.poll(request_id)
    return run(ask())


Log = list[tuple[str, dict[str, Any]]]


def audited(source: EscrowProcess | Log, event: str, **match: object) -> list[dict[str, Any]]:
    """The details of the audit records of ``event`` with the ``match``ing ones, from the
    escrow's log now (or from what was read of it before)."""
    log = source.audit(event, last=400) if isinstance(source, EscrowProcess) else source
    return [d for e, d in log if e == event and all(d.get(k) == v for k, v in match.items())]


def refusal(source: EscrowProcess | Log, action: str, window_id: str) -> str:
    """The reason the newest audited refusal of ``action`` on the window gives."""
    found = audited(source, f"{action}.refused", window_id=window_id)
    assert found, f"no {action}.refused for {window_id}"
    return str(found[-1]["reason"])


def manual(escrow: EscrowProcess) -> tuple[Cluster, Node, UnlockKey]:
    """A cluster of alice, bob and carol, any two, with no automatic slot."""
    return enrolled(escrow, 2, "alice,bob,carol")


# -- windows that approve --------------------------------------------------------------------

def test_a_window_signed_by_two_custodians_unlocks_a_named_manager_with_no_one_awake(
        escrow: EscrowProcess) -> None:
    cluster, node, key = manual(escrow)
    window_id = open_window(escrow, "alice", cluster, [node])
    signed = ok(escrow.as_custodian("bob", "window", "sign", window_id, "--yes"))
    assert "signed by alice, bob" in signed
    status, keys = unseal(escrow, node)
    assert (status.state, sorted(status.approvals)) == ("ready", ["alice", "bob"])
    assert keys == [(1, key)]
    log = escrow.audit("window.", last=400)
    approvals = audited(log, "window.approve", request_id=status.request_id)
    assert sorted(d["window_id"] for d in approvals) == [window_id, window_id]
    opened = audited(log, "window.open", window_id=window_id)
    assert opened[0]["nodes"] == [node.node_id]
    assert audited(log, "window.sign", window_id=window_id)
    [shown] = json.loads(ok(escrow.as_custodian("carol", "window", "list", "--cluster",
                                                 cluster.cluster_id, "--json")))
    assert (shown["window_id"], shown["used"], shown["restarts"], shown["state"],
            shown["signers"]) == (window_id, 1, 1, "used", ["alice", "bob"])
    # Custodians see where the approvals came from.
    pending = json.loads(ok(escrow.as_custodian("carol", "requests", "--json")))
    [mine] = [p for p in pending if p["request_id"] == status.request_id]
    assert mine["window_approvals"] == {"alice": window_id, "bob": window_id}
    assert f"alice (window {window_id})" in ok(escrow.as_custodian("carol", "requests"))


def test_a_window_signed_by_one_of_two_needed_waits_for_one_live_approval_counted_once(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    window_id = open_window(escrow, "alice", cluster, [node])
    status, keys = unseal(escrow, node)
    assert (status.state, status.needed, status.approvals, keys) == (
        "pending", 1, ["alice"], [])
    again = escrow.as_custodian("alice", "approve", status.request_id, "--yes")
    assert again.returncode == 1
    assert "already decided" in again.stderr
    assert (poll(escrow, status.request_id).needed) == 1
    ok(escrow.as_custodian("bob", "approve", status.request_id, "--yes"))
    ready = poll(escrow, status.request_id)
    assert (ready.state, sorted(ready.approvals)) == ("ready", ["alice", "bob"])
    assert sorted(r.holder for r in ready.releases) == ["alice", "bob"]
    assert listed(escrow, "bob", window_id)["used"] == 1


def test_the_restarts_count_runs_out_then_the_manager_waits_for_custodians(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    window_id = open_window(escrow, "alice", cluster, [node], restarts=2)
    ok(escrow.as_custodian("carol", "window", "sign", window_id, "--yes"))
    first, _ = unseal(escrow, node)
    second, _ = unseal(escrow, node)
    third, keys = unseal(escrow, node)
    assert [r.state for r in (first, second)] == ["ready", "ready"]
    assert (third.state, third.needed, third.approvals, keys) == ("pending", 2, [], [])
    assert not audited(escrow, "window.approve", request_id=third.request_id)
    assert listed(escrow, "alice", window_id)["state"] == "used"


def test_a_manager_not_named_in_the_window_waits_for_custodians(escrow: EscrowProcess) -> None:
    cluster, named, _ = manual(escrow)
    other = cluster.node()
    run(enroll(escrow, other))
    window_id = open_window(escrow, "alice", cluster, [named])
    ok(escrow.as_custodian("bob", "window", "sign", window_id, "--yes"))
    status, keys = unseal(escrow, other)
    assert (status.state, status.needed, status.approvals, keys) == ("pending", 2, [], [])
    assert listed(escrow, "alice", window_id)["used"] == 0


def test_a_closed_window_approves_nothing_more(escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    window_id = open_window(escrow, "alice", cluster, [node], restarts=5)
    ok(escrow.as_custodian("bob", "window", "sign", window_id, "--yes"))
    # carol signed nothing, but holds a slot of the cluster: she may close it.
    assert "closed" in ok(escrow.as_custodian("carol", "window", "close", window_id, "--yes"))
    status, _ = unseal(escrow, node)
    assert (status.state, status.approvals) == ("pending", [])
    shown = listed(escrow, "alice", window_id)
    assert (shown["state"], shown["closed_by"], shown["used"]) == ("closed", "carol", 0)
    assert "closed by carol" in ok(escrow.as_custodian("bob", "window", "list", "--cluster",
                                                       cluster.cluster_id))
    twice = escrow.as_custodian("alice", "window", "close", window_id, "--yes")
    assert twice.returncode == 1
    assert "was closed by carol" in twice.stderr
    late = escrow.as_custodian("carol", "window", "sign", window_id, "--yes")
    assert late.returncode == 1
    log = escrow.audit("window.", last=400)
    assert audited(log, "window.close", window_id=window_id)
    assert refusal(log, "window.close", window_id) == "already_closed"
    assert refusal(log, "window.sign", window_id) == "window_not_open"


# -- who may, and what they may sign ----------------------------------------------------------

def test_a_custodian_without_a_slot_can_neither_open_nor_sign_nor_close_a_window(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    refused = escrow.as_custodian("dave", "window", "open", "--cluster", cluster.cluster_id,
                                  "--node", node.node_id, "--restarts", "1", "--for", "1h",
                                  "--reason", "let me in", "--yes")
    assert refused.returncode == 1
    assert "dave holds no slot" in refused.stderr
    assert any(d["reason"] == "not_a_custodian" and d["custodian"] == "dave"
               for d in audited(escrow, "window.open.refused"))
    window_id = open_window(escrow, "alice", cluster, [node])
    # dave does not see the window, so the CLI has nothing to show him; the API refuses him.
    assert window_id not in ok(escrow.as_custodian("dave", "window", "list"))
    shown = WindowView.model_validate(listed(escrow, "alice", window_id))
    dave = escrow.api_as("dave")
    with pytest.raises(IdentityError) as signing:
        dave.call("POST", f"/v1/windows/{window_id}/sign", WindowView, WindowSignRequest(
            signature=protocol.sign(dave.key, protocol.window_payload(
                shown.window_id, shown.cluster_id, shown.nodes, shown.restarts,
                shown.expires_at, shown.reason))))
    assert (signing.value.status, signing.value.reason) == (403, "not_a_custodian")
    assert refusal(escrow, "window.sign", window_id) == "not_a_custodian"
    with pytest.raises(IdentityError) as closing:
        dave.call("POST", f"/v1/windows/{window_id}/close", WindowView,
                  protocol.WindowCloseRequest())
    assert (closing.value.status, closing.value.reason) == (403, "not_a_custodian")
    assert listed(escrow, "alice", window_id)["signers"] == ["alice"]


def test_a_co_signer_signing_other_facts_than_the_window_holds_is_refused(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    window_id = open_window(escrow, "alice", cluster, [node])
    shown = WindowView.model_validate(listed(escrow, "bob", window_id))
    bob = escrow.api_as("bob")
    with pytest.raises(IdentityError) as signing:  # bob signed five restarts, not one
        bob.call("POST", f"/v1/windows/{window_id}/sign", WindowView, WindowSignRequest(
            signature=protocol.sign(bob.key, protocol.window_payload(
                shown.window_id, shown.cluster_id, shown.nodes, 5, shown.expires_at,
                shown.reason))))
    assert (signing.value.status, signing.value.reason) == (401, "bad_signature")
    assert refusal(escrow, "window.sign", window_id) == "bad_signature"
    assert listed(escrow, "bob", window_id)["signers"] == ["alice"]
    status, _ = unseal(escrow, node)
    assert (status.needed, status.approvals) == (1, ["alice"])


def test_an_opening_whose_signature_covers_other_facts_is_refused(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    alice = escrow.api_as("alice")
    window_id = "w-" + "f" * 20
    expires = timestamp(datetime.now(UTC) + timedelta(hours=1))
    signature = protocol.sign(alice.key, protocol.window_payload(
        window_id, cluster.cluster_id, [node.node_id], 1, expires, "one restart"))
    with pytest.raises(IdentityError) as opening:  # the body asks for 100 restarts
        alice.call("POST", "/v1/windows", WindowView, WindowOpenRequest(
            window_id=window_id, cluster_id=cluster.cluster_id, nodes=[node.node_id],
            restarts=100, expires_at=expires, reason="one restart", signature=signature))
    assert (opening.value.status, opening.value.reason) == (401, "bad_signature")
    assert refusal(escrow, "window.open", window_id) == "bad_signature"


def test_a_forged_window_id_is_refused_and_an_id_taken_cannot_be_opened_again(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    bob = escrow.api_as("bob")
    forged = "w-" + "z" * 20
    expires = timestamp(datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(IdentityError) as signing:
        bob.call("POST", f"/v1/windows/{forged}/sign", WindowView, WindowSignRequest(
            signature=protocol.sign(bob.key, protocol.window_payload(
                forged, cluster.cluster_id, [node.node_id], 1, expires, "forged"))))
    assert (signing.value.status, signing.value.reason) == (404, "unknown_window")
    assert refusal(escrow, "window.sign", forged) == "unknown_window"
    with pytest.raises(IdentityError) as odd:  # not even a window id's shape
        bob.call("POST", "/v1/windows/w-..%2Fx/close", WindowView,
                 protocol.WindowCloseRequest())
    assert (odd.value.status, odd.value.reason) == (404, "unknown_window")
    window_id = open_window(escrow, "alice", cluster, [node])
    taken = escrow.api_as("carol")
    with pytest.raises(IdentityError) as again:
        taken.call("POST", "/v1/windows", WindowView, WindowOpenRequest(
            window_id=window_id, cluster_id=cluster.cluster_id, nodes=[node.node_id],
            restarts=100, expires_at=expires, reason="mine now",
            signature=protocol.sign(taken.key, protocol.window_payload(
                window_id, cluster.cluster_id, [node.node_id], 100, expires, "mine now"))))
    assert (again.value.status, again.value.reason) == (409, "window_exists")
    shown = listed(escrow, "alice", window_id)
    assert (shown["restarts"], shown["signers"]) == (1, ["alice"])


def test_a_window_names_only_enrolled_managers_of_its_cluster(escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    _, stranger, _ = manual(escrow)  # enrolled, but in another cluster
    refused = escrow.as_custodian("alice", "window", "open", "--cluster", cluster.cluster_id,
                                  "--node", node.node_id, "--node", stranger.node_id,
                                  "--restarts", "1", "--for", "1h", "--reason", "x", "--yes")
    assert refused.returncode == 1
    assert f"node {stranger.node_id} is not enrolled in cluster {cluster.cluster_id}" in (
        refused.stderr)
    assert any(d["reason"] == "unknown_node" for d in audited(escrow, "window.open.refused"))


def test_an_expiry_past_or_further_ahead_than_the_bound_is_refused(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = manual(escrow)
    too_long = escrow.as_custodian("alice", "window", "open", "--cluster", cluster.cluster_id,
                                   "--node", node.node_id, "--restarts", "1", "--for", "25h",
                                   "--reason", "a long weekend", "--yes")
    assert too_long.returncode == 1
    assert "would last more than 24 h" in too_long.stderr
    alice = escrow.api_as("alice")
    window_id = "w-" + "p" * 20
    past = timestamp(datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(IdentityError) as opening:
        alice.call("POST", "/v1/windows", WindowView, WindowOpenRequest(
            window_id=window_id, cluster_id=cluster.cluster_id, nodes=[node.node_id],
            restarts=1, expires_at=past, reason="yesterday",
            signature=protocol.sign(alice.key, protocol.window_payload(
                window_id, cluster.cluster_id, [node.node_id], 1, past, "yesterday"))))
    assert (opening.value.status, opening.value.reason) == (400, "bad_expiry")
    assert refusal(escrow, "window.open", window_id) == "bad_expiry"


# -- after the clock moved: the deny window, and a window's expiry ----------------------------

@dataclass(frozen=True)
class Later:
    """Requests (and a window) made before the escrow's clock moved JUMP_SECONDS ahead."""

    by_default: RequestStatus  # of a cluster with a 1 min deny window, undenied
    by_default_key: UnlockKey
    by_default_ephemeral: X25519PrivateKey
    denied: RequestStatus  # of such a cluster, denied by a custodian within the minute
    waiting: RequestStatus  # of a cluster without a deny window
    expired_window: str
    expired_window_node: Node


@pytest.fixture(scope="module")
def later(escrow: EscrowProcess, escrow_clock: Path) -> Later:
    def deny_window() -> tuple[Cluster, Node, UnlockKey]:
        cluster, node, key = enrolled(escrow, 2, "auto,alice,bob")
        ok(escrow.cli("cluster", "set", cluster.cluster_id, "--approve-after", "1m"))
        return cluster, node, key

    _, proceeding, key = deny_window()
    by_default, ephemeral = ask(escrow, proceeding)
    assert (by_default.state, by_default.needed) == ("pending", 1)
    assert list(candidate_keys(by_default, ephemeral)) == []
    _, stopped, _ = deny_window()
    denied, _ = unseal(escrow, stopped)
    ok(escrow.as_custodian("alice", "deny", denied.request_id, "--reason", "not planned",
                           "--yes"))
    _, plain_node, _ = enrolled(escrow, 2, "auto,alice,bob")
    waiting, _ = unseal(escrow, plain_node)
    cluster, windowed, _ = manual(escrow)
    window_id = open_window(escrow, "alice", cluster, [windowed], duration="1m")
    ok(escrow.as_custodian("bob", "window", "sign", window_id, "--yes"))
    escrow_clock.write_text(f"+{JUMP_SECONDS}\n")
    return Later(by_default, key, ephemeral, denied, waiting, window_id, windowed)


def test_a_request_proceeds_after_the_deny_window_and_the_audit_says_so_once(
        escrow: EscrowProcess, later: Later) -> None:
    asked = later.by_default
    created = parse_timestamp(asked.created_at)
    # Its expiry leaves the delay's room on top of the usual TTL (900 s).
    assert parse_timestamp(asked.expires_at) == created + timedelta(seconds=60 + 900)
    ready = poll(escrow, asked.request_id)
    assert (ready.state, ready.needed, ready.approvals) == ("ready", 0, [])
    assert sorted(r.holder for r in ready.releases) == ["alice", "auto"]
    assert list(candidate_keys(ready, later.by_default_ephemeral)) == [
        (1, later.by_default_key)]
    poll(escrow, asked.request_id)  # a second poll audits nothing more
    [record] = audited(escrow, "unseal.approved_by_default", request_id=asked.request_id)
    assert "approved by default after 1 min" in record["message"]
    assert record["in_place_of"] == ["alice"]


def test_the_deny_window_is_shown_to_custodians_before_it_passes(
        escrow: EscrowProcess, later: Later) -> None:
    shown = json.loads(ok(escrow.as_custodian("bob", "requests", "--json")))
    by_request = {p["request_id"]: p for p in shown}
    assert by_request[later.by_default.request_id]["approves_by_default_at"] == timestamp(
        parse_timestamp(later.by_default.created_at) + timedelta(minutes=1))
    assert by_request[later.waiting.request_id]["approves_by_default_at"] == ""
    assert ok(escrow.cli("cluster", "list")).count("approves after 1 min") >= 2


def test_a_custodian_deny_before_the_deny_window_passed_stops_the_request(
        escrow: EscrowProcess, later: Later) -> None:
    after = poll(escrow, later.denied.request_id)
    assert (after.state, after.releases) == ("denied", [])
    assert "not planned" in after.denial_reason
    assert not audited(escrow, "unseal.approved_by_default", request_id=later.denied.request_id)


def test_without_a_deny_window_a_request_waits_for_custodians_however_long(
        escrow: EscrowProcess, later: Later) -> None:
    after = poll(escrow, later.waiting.request_id)
    assert (after.state, after.needed, after.releases[0].holder, len(after.releases)) == (
        "pending", 1, "auto", 1)
    assert not audited(escrow, "unseal.approved_by_default",
                       request_id=later.waiting.request_id)


def test_an_expired_window_approves_nothing(escrow: EscrowProcess, later: Later) -> None:
    status, keys = unseal(escrow, later.expired_window_node)
    assert (status.state, status.needed, status.approvals, keys) == ("pending", 2, [], [])
    shown = listed(escrow, "alice", later.expired_window)
    assert (shown["state"], shown["used"]) == ("expired", 0)


def test_a_deny_window_outside_a_minute_to_a_day_is_refused(escrow: EscrowProcess) -> None:
    cluster, _, _ = manual(escrow)
    for spelled in ("30s", "25h"):
        refused = escrow.cli("cluster", "set", cluster.cluster_id, "--approve-after", spelled)
        assert refused.returncode == 1
        assert "outside 1 min..24 h" in refused.stderr
    ok(escrow.cli("cluster", "set", cluster.cluster_id, "--approve-after", "15m"))
    assert "approves after 15 min unless denied" in ok(escrow.cli("cluster", "show",
                                                                  cluster.cluster_id))
    ok(escrow.cli("cluster", "set", cluster.cluster_id, "--approve-after", "off"))
    changes = [d["approve_after_seconds"] for e, d in escrow.audit("cluster.set_approve_after")
               if e == "cluster.set_approve_after"]
    assert changes[-2:] == [900, 0]


# -- the store, on SQLite and PostgreSQL: one restart per claim, across replicas --------------

STORE_CLUSTER = "s" * 25


def _stored_window(store: SqlStore, expires_at: str, restarts: int = 1) -> WindowRecord:
    store.add_cluster(ClusterRecord(STORE_CLUSTER, "pem", Policy(2, ("alice", "bob")),
                                    "2026-11-01T00:00:00.000+00:00"),
                      AuditEvent("cluster.add", "test", STORE_CLUSTER))
    window = WindowRecord("w-" + "s" * 20, STORE_CLUSTER, ("n" * 25,), restarts, 0, expires_at,
                          "patch night", "2026-11-01T11:00:00.000+00:00",
                          signatures={"alice": "sig-a"})
    store.open_window(window, AuditEvent("window.open", "custodian:alice", STORE_CLUSTER))
    return window


def _claiming(store: SqlStore, request_id: str, now: str) -> list[str]:
    request = RequestRecord(request_id, STORE_CLUSTER, "n" * 25, "host", "boot", "127.0.0.1",
                            "pem", b"k" * 32, "", now, "2026-11-01T13:00:00.000+00:00",
                            RequestState.PENDING)
    claim = WindowClaim("w-" + "s" * 20, now, [(
        ApprovalRecord(request_id, "alice", Decision.APPROVE, "sig-a", "window", now,
                       window_id="w-" + "s" * 20),
        AuditEvent("window.approve", "custodian:alice", STORE_CLUSTER,
                   {"request_id": request_id}))])
    return store.create_request(request, AuditEvent("unseal.request", "node:n", STORE_CLUSTER),
                                window=claim)


def test_a_window_claimed_to_its_count_by_another_replica_issues_nothing_more(
        store: SqlStore, backend: Backend) -> None:
    _stored_window(store, "2026-11-01T14:00:00.000+00:00")
    replica = backend.open()
    try:
        _claiming(store, "r-1", "2026-11-01T12:00:00.000+00:00")
        with pytest.raises(WindowTaken):
            _claiming(replica, "r-2", "2026-11-01T12:00:01.000+00:00")
    finally:
        replica.close()
    assert store.get_request("r-2") is None  # nothing of the failed write stayed
    assert [a.window_id for a in store.list_approvals("r-1")] == ["w-" + "s" * 20]
    assert store.list_approvals("r-2") == []
    window = store.get_window("w-" + "s" * 20)
    assert window is not None
    assert window.used == 1
    assert [r.event for r in store.iter_audit()].count("window.approve") == 1


def test_a_closed_or_expired_window_cannot_be_claimed(store: SqlStore) -> None:
    _stored_window(store, "2026-11-01T14:00:00.000+00:00", restarts=5)
    with pytest.raises(WindowTaken):  # at its expiry
        _claiming(store, "r-1", "2026-11-01T14:00:00.000+00:00")
    store.close_window("w-" + "s" * 20, "bob", "2026-11-01T12:00:00.000+00:00",
                       AuditEvent("window.close", "custodian:bob", STORE_CLUSTER))
    with pytest.raises(WindowTaken):
        _claiming(store, "r-2", "2026-11-01T12:00:01.000+00:00")
    with pytest.raises(Conflict, match="closed already by bob"):
        store.close_window("w-" + "s" * 20, "alice", "2026-11-01T12:00:02.000+00:00",
                           AuditEvent("window.close", "custodian:alice", STORE_CLUSTER))
    with pytest.raises(Conflict, match="was closed"):
        store.sign_window("w-" + "s" * 20, "bob", "sig-b", "2026-11-01T12:00:03.000+00:00",
                          AuditEvent("window.sign", "custodian:bob", STORE_CLUSTER))


def test_windows_keep_their_facts_and_signatures_in_signing_order(store: SqlStore) -> None:
    window = _stored_window(store, "2026-11-01T14:00:00.000+00:00")
    store.sign_window(window.window_id, "bob", "sig-b", "2026-11-01T11:30:00.000+00:00",
                      AuditEvent("window.sign", "custodian:bob", STORE_CLUSTER))
    with pytest.raises(Conflict, match="signed window"):
        store.sign_window(window.window_id, "bob", "sig-b", "2026-11-01T11:31:00.000+00:00",
                          AuditEvent("window.sign", "custodian:bob", STORE_CLUSTER))
    with pytest.raises(Conflict, match="exists already"):
        store.open_window(window, AuditEvent("window.open", "custodian:bob", STORE_CLUSTER))
    stored = store.get_window(window.window_id)
    assert stored is not None
    assert stored == replace(window, signatures={"alice": "sig-a", "bob": "sig-b"})
    assert list(stored.signatures) == ["alice", "bob"]
    assert store.list_windows(STORE_CLUSTER) == [stored]
    assert store.list_windows() == [stored]
    assert store.list_windows(STORE_CLUSTER, open_at="2026-11-01T13:59:59.999+00:00") == [stored]
    assert store.list_windows(STORE_CLUSTER, open_at="2026-11-01T14:00:00.000+00:00") == []
    assert store.list_windows("x" * 25) == []
    assert store.get_window("w-" + "x" * 20) is None


def test_a_cluster_keeps_its_deny_window_until_it_is_turned_off(store: SqlStore) -> None:
    _stored_window(store, "2026-11-01T14:00:00.000+00:00")
    store.set_approve_after(STORE_CLUSTER, 900, AuditEvent("cluster.set_approve_after", "t",
                                                           STORE_CLUSTER))
    assert store.get_cluster(STORE_CLUSTER).approve_after_seconds == 900
    store.set_approve_after(STORE_CLUSTER, 0, AuditEvent("cluster.set_approve_after", "t",
                                                         STORE_CLUSTER))
    assert [c.approve_after_seconds for c in store.list_clusters()] == [0]
    with pytest.raises(NotFound):
        store.set_approve_after("x" * 25, 60, AuditEvent("cluster.set_approve_after", "t"))
