"""Maintenance windows and the deny window as pure decisions: whether a window approves a new
request now, the approvals it gives, what a custodian signs, and the plan that proceeds after
the deny window with no denial. No store, no token, a fixed clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from escrow.core import protocol
from escrow.core.durations import describe, parse_duration
from escrow.core.errors import InputError, PolicyError
from escrow.core.states import Decision, RequestState, WindowState
from escrow.core.timestamps import timestamp
from escrow.notifications import body, events
from escrow.policy import Policy, check_approve_after
from escrow.server.openapi import openapi_document
from escrow.service import windows
from escrow.service.plan import approved_by_default, default_approval_at, plan
from escrow.store import ApprovalRecord, KeyVersionRecord, RequestRecord, ShareRecord, WindowRecord

CLUSTER = "c" * 25
NODE, OTHER = "n" * 25, "m" * 25
NOW = datetime(2026, 11, 1, 22, 0, tzinfo=UTC)
BOTH = {"alice", "bob", "carol"}


def window(**changes: object) -> WindowRecord:
    made = WindowRecord("w-" + "a" * 20, CLUSTER, (NODE,), 1, 0,
                        timestamp(NOW + timedelta(hours=2)), "kernel 6.18 patch night",
                        timestamp(NOW - timedelta(hours=1)),
                        signatures={"alice": "sig-a", "bob": "sig-b"})
    return replace(made, **changes)  # type: ignore[arg-type]


def request(node: str = NODE, created: datetime = NOW,
            state: RequestState = RequestState.PENDING) -> RequestRecord:
    return RequestRecord("r-1", CLUSTER, node, "manager-1", "boot", "127.0.0.1", "pem",
                         b"\x09" * 32, "", timestamp(created),
                         timestamp(created + timedelta(minutes=30)), state)


def version(threshold: int, slots: tuple[str, ...]) -> KeyVersionRecord:
    return KeyVersionRecord(CLUSTER, 1, "fp", Policy(threshold, slots), "t")


def shares_of(record: KeyVersionRecord) -> list[ShareRecord]:
    return [ShareRecord(CLUSTER, 1, slot, holder, b"w")
            for slot, holder in enumerate(record.policy.slots)]


# -- a window's state and whether it applies -------------------------------------------------

def test_an_open_window_approves_a_request_of_a_node_it_names() -> None:
    assert windows.state(window(), NOW) == WindowState.OPEN
    assert windows.applies(window(), request(), NOW, BOTH)


def test_a_request_of_a_node_not_in_the_window_gets_nothing() -> None:
    assert not windows.applies(window(), request(OTHER), NOW, BOTH)


def test_a_window_of_another_cluster_approves_nothing_here() -> None:
    assert not windows.applies(window(cluster_id="x" * 25), request(), NOW, BOTH)


def test_an_expired_window_approves_nothing() -> None:
    at_expiry = NOW + timedelta(hours=2)
    assert windows.state(window(), at_expiry) == WindowState.EXPIRED
    assert not windows.applies(window(), request(created=at_expiry), at_expiry, BOTH)


def test_a_window_whose_restarts_are_used_approves_nothing() -> None:
    used = window(used=1)
    assert windows.state(used, NOW) == WindowState.USED
    assert not windows.applies(used, request(), NOW, BOTH)


def test_a_closed_window_approves_nothing_whatever_its_count_and_time() -> None:
    closed = window(closed_at=timestamp(NOW), closed_by="alice", used=1)
    assert windows.state(closed, NOW + timedelta(days=1)) == WindowState.CLOSED
    assert not windows.applies(closed, request(), NOW, BOTH)


def test_a_signer_who_lost_their_slot_gives_no_approval() -> None:
    assert windows.counted_signers(window(), {"bob"}) == ["bob"]
    assert not windows.applies(window(), request(), NOW, {"carol"})


def test_of_two_windows_the_one_giving_more_approvals_then_ending_sooner_is_used() -> None:
    one = window(window_id="w-" + "1" * 20, signatures={"alice": "a"})
    two_late = window(window_id="w-" + "2" * 20, expires_at=timestamp(NOW + timedelta(hours=5)))
    two_soon = window(window_id="w-" + "3" * 20)
    chosen = windows.choose([one, two_late, two_soon], request(), NOW, BOTH)
    assert chosen is not None
    assert chosen.window_id == two_soon.window_id
    assert windows.choose([one], request(OTHER), NOW, BOTH) is None


def test_a_claim_gives_each_counted_signer_an_approval_with_their_window_signature() -> None:
    claim = windows.claim(window(), request(), NOW, BOTH)
    assert claim.window_id == window().window_id
    assert claim.now == timestamp(NOW)
    records = [approval for approval, _ in claim.approvals]
    assert [(a.custodian, a.decision, a.signature, a.window_id) for a in records] == [
        ("alice", Decision.APPROVE, "sig-a", window().window_id),
        ("bob", Decision.APPROVE, "sig-b", window().window_id)]
    assert all(window().window_id in a.reason for a in records)
    audited = [event for _, event in claim.approvals]
    assert {e.event for e in audited} == {"window.approve"}
    assert all(e.details["window_id"] == window().window_id for e in audited)
    assert windows.window_approvals(records) == {"alice": window().window_id,
                                                 "bob": window().window_id}


def test_a_window_signed_by_one_custodian_is_one_approval_of_a_policy_needing_two() -> None:
    v1 = version(2, ("alice", "bob", "carol"))
    claim = windows.claim(window(signatures={"alice": "a"}), request(), NOW, BOTH)
    planned = plan([v1], {1: shares_of(v1)}, {a.custodian for a, _ in claim.approvals}, 10)
    assert planned.needed == 1
    both = windows.claim(window(), request(), NOW, BOTH)
    assert plan([v1], {1: shares_of(v1)}, {a.custodian for a, _ in both.approvals},
                10).needed == 0


# -- what custodians sign --------------------------------------------------------------------

def test_a_window_signature_covers_every_fact_so_a_co_signer_of_other_facts_fails() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    facts = ("w-" + "a" * 20, CLUSTER, [NODE, OTHER], 1, timestamp(NOW), "patch night")
    signature = protocol.sign(key, protocol.window_payload(*facts))
    # The nodes' order is not a fact: they are signed sorted.
    assert protocol.verify(key.public_key(), signature,
                           protocol.window_payload(facts[0], facts[1], [OTHER, NODE],
                                                   *facts[3:]))
    for changed in range(len(facts)):
        other = list(facts)
        other[changed] = {0: "w-" + "b" * 20, 1: "x" * 25, 2: [NODE], 3: 2,
                          4: timestamp(NOW + timedelta(hours=1)), 5: "patch nights"}[changed]
        assert not protocol.verify(key.public_key(), signature,
                                   protocol.window_payload(*other))  # type: ignore[arg-type]


def test_a_window_signature_is_under_a_domain_of_its_own_so_it_approves_no_request() -> None:
    payload = protocol.window_payload("w-" + "a" * 20, CLUSTER, [NODE], 1, timestamp(NOW), "x")
    assert payload.startswith(b"s\x00\x00\x00\x16swarm-unseal/v2/window")


@pytest.mark.parametrize("change", [
    {"window_id": "w-short"}, {"window_id": "x-" + "a" * 20}, {"nodes": []},
    {"nodes": [NODE, NODE]}, {"nodes": ["n" * 24]}, {"restarts": 0}, {"restarts": 101},
    {"nodes": [f"{i:025d}" for i in range(65)]},
    {"expires_at": "2026-11-01T22:00:00Z"}, {"expires_at": "2026-11-01T22:00:00.000+01:00"},
    {"expires_at": "\u0662\u0660\u0662\u0666-11-01T22:00:00.000+00:00"},
    {"reason": ""}, {"reason": "a\nb"}, {"reason": "x" * 501},
], ids=lambda change: next(iter(change)))
def test_a_window_body_outside_its_bounds_is_refused(change: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "window_id": "w-" + "a" * 20, "cluster_id": CLUSTER, "nodes": [NODE], "restarts": 1,
        "expires_at": timestamp(NOW), "reason": "patch night", "signature": "c2ln"}
    protocol.WindowOpenRequest.model_validate(fields)
    with pytest.raises(ValidationError):
        protocol.WindowOpenRequest.model_validate(fields | change)


def test_every_window_route_is_in_the_openapi_document() -> None:
    paths = openapi_document()["paths"]
    assert set(paths["/v1/windows"]) == {"get", "post"}
    assert "post" in paths["/v1/windows/{window_id}/sign"]
    assert "post" in paths["/v1/windows/{window_id}/close"]


# -- the deny window -------------------------------------------------------------------------

def test_without_a_deny_window_a_request_waits_for_custodians_however_long() -> None:
    assert default_approval_at(request(), 0) is None
    assert not approved_by_default(request(), [], 0, NOW + timedelta(days=1))


def test_the_deny_window_approves_a_pending_undenied_request_once_its_delay_passed() -> None:
    assert default_approval_at(request(), 900) == NOW + timedelta(minutes=15)
    assert not approved_by_default(request(), [], 900, NOW + timedelta(minutes=14, seconds=59))
    assert approved_by_default(request(), [], 900, NOW + timedelta(minutes=15))


def test_a_denial_before_the_delay_stops_the_default_approval() -> None:
    denied = [ApprovalRecord("r-1", "carol", Decision.DENY, "s", "not planned", "t")]
    assert not approved_by_default(request(), denied, 900, NOW + timedelta(minutes=20))
    stored_denied = request(state=RequestState.DENIED)
    assert not approved_by_default(stored_denied, [], 900, NOW + timedelta(minutes=20))


def test_an_expired_request_is_not_approved_by_default() -> None:
    assert not approved_by_default(request(), [], 900, NOW + timedelta(minutes=31))


def test_a_plan_approved_by_default_fills_the_threshold_with_custodian_slots_in_order() -> None:
    v1 = version(3, ("auto", "carol", "alice", "bob"))
    waiting = plan([v1], {1: shares_of(v1)}, {"bob"}, 10)
    assert (waiting.needed, waiting.by_default) == (1, frozenset())
    proceeding = plan([v1], {1: shares_of(v1)}, {"bob"}, 10, by_default=True)
    assert [s.holder for s in proceeding.releases[0].shares] == ["auto", "bob", "carol"]
    assert (proceeding.needed, proceeding.by_default) == (0, frozenset({"carol"}))


def test_a_plan_needing_no_custodian_is_not_marked_approved_by_default() -> None:
    v1 = version(2, ("auto", "auto", "alice"))
    assert plan([v1], {1: shares_of(v1)}, set(), 10, by_default=True).by_default == frozenset()


def test_a_deny_window_shorter_than_a_minute_or_longer_than_a_day_is_refused() -> None:
    assert check_approve_after(0) == 0
    assert check_approve_after(60) == 60
    assert check_approve_after(86400) == 86400
    for seconds in (59, 86401, -1):
        with pytest.raises(PolicyError, match=r"outside 1 min\.\.24 h"):
            check_approve_after(seconds)


def test_durations_are_read_and_said_as_people_write_them() -> None:
    assert [parse_duration(t, "--for") for t in ("15m", "2h", "1h30m", "90s", "1d")] == [
        900, 7200, 5400, 90, 86400]
    assert [describe(s) for s in (900, 3600, 5400, 90)] == ["15 min", "1 h", "1 h 30 min",
                                                             "90 s"]
    for bad in ("", "15", "m", "1.5h", "-1h", "1h 30m", "15 minutes", "\u0661\u0665m"):
        with pytest.raises(InputError, match="is not a duration"):
            parse_duration(bad, "--for")


def test_the_requested_notification_says_when_it_is_approved_by_default_unless_denied() -> None:
    plain = body.body(events.requested(request(), 1, NOW))
    assert "approves_by_default_at" not in plain
    at = timestamp(NOW + timedelta(minutes=15))
    told = body.body(events.requested(request(), 1, NOW, at))
    assert told["approves_by_default_at"] == at
    assert f"approved by default at `{at}` unless a custodian denies it" in told["text"]
