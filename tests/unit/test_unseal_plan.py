"""The unseal plan (which shares a request may have) and the release step (each share
unwrapped once per request), as pure logic: no store, no token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from escrow.core import protocol
from escrow.core.protocol import HPKE
from escrow.core.states import Decision, RequestState
from escrow.core.timestamps import timestamp
from escrow.policy import Policy
from escrow.service.plan import approvers, plan, state_at
from escrow.service.release import Releases
from escrow.store import ApprovalRecord, KeyVersionRecord, RequestRecord, ShareRecord

CLUSTER = "c1"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def version(number: int, threshold: int, slots: tuple[str, ...]) -> KeyVersionRecord:
    return KeyVersionRecord(CLUSTER, number, f"fp{number}", Policy(threshold, slots), "t")


def shares_of(record: KeyVersionRecord) -> list[ShareRecord]:
    return [ShareRecord(CLUSTER, record.version, slot, holder, b"w")
            for slot, holder in enumerate(record.policy.slots)]


def request(state: RequestState = RequestState.PENDING, expires: datetime = NOW,
            key: bytes = b"\x09" * 32) -> RequestRecord:
    return RequestRecord("r-1", CLUSTER, "n1", "host", "unknown", "127.0.0.1", "pem", key, "",
                         timestamp(NOW - timedelta(minutes=1)), timestamp(expires), state)


def test_automatic_slots_come_first_then_approvers_up_to_the_threshold() -> None:
    v1 = version(1, 3, ("alice", "auto", "bob", "auto", "carol"))
    planned = plan([v1], {1: shares_of(v1)}, {"carol", "bob"}, 10)
    assert [s.holder for s in planned.releases[0].shares] == ["auto", "auto", "bob"]
    assert planned.needed == 0


def test_the_newest_version_waiting_for_custodians_while_an_older_one_is_complete() -> None:
    newest = version(2, 3, ("auto", "alice", "bob"))
    older = version(1, 2, ("auto", "auto", "alice"))
    planned = plan([newest, older], {2: shares_of(newest), 1: shares_of(older)}, set(), 10)
    assert planned.threshold == 3
    assert planned.needed == 2
    assert [len(r.shares) for r in planned.releases] == [1, 2]


def test_only_the_newest_retained_versions_are_offered() -> None:
    versions = [version(n, 1, ("auto",)) for n in (5, 4, 3)]
    planned = plan(versions, {v.version: shares_of(v) for v in versions}, set(), 2)
    assert [r.version.version for r in planned.releases] == [5, 4]


def test_a_cluster_without_a_key_plans_nothing_and_needs_nothing() -> None:
    planned = plan([], {}, set(), 10)
    assert (planned.releases, planned.threshold, planned.needed) == ((), 0, 0)


def test_only_slot_holders_of_a_retained_version_are_eligible() -> None:
    v1 = version(1, 2, ("auto", "alice"))
    planned = plan([v1], {1: shares_of(v1)}, set(), 10)
    assert planned.eligible("alice")
    assert not planned.eligible("mallory")


def test_a_denial_is_no_approval() -> None:
    approvals = [ApprovalRecord("r-1", "alice", Decision.APPROVE, "s", "", "t"),
                 ApprovalRecord("r-1", "bob", Decision.DENY, "s", "no", "t")]
    assert approvers(approvals) == ["alice"]


def test_a_pending_request_past_its_expiry_has_expired_and_others_keep_their_state() -> None:
    assert state_at(request(), NOW) == RequestState.PENDING
    assert state_at(request(), NOW + timedelta(seconds=1)) == RequestState.EXPIRED
    assert state_at(request(RequestState.DENIED), NOW + timedelta(days=1)) == RequestState.DENIED


def test_polling_a_request_unwraps_each_share_once_and_returns_the_same_ciphertexts() -> None:
    peer = X25519PrivateKey.generate()
    unwrapped: list[tuple[int, int]] = []

    def unwrap(share: ShareRecord) -> str:
        unwrapped.append((share.version, share.slot))
        return f"words of slot {share.slot}"

    releases = Releases(unwrap)
    v1 = version(1, 2, ("auto", "auto", "alice"))
    live = request(key=peer.public_key().public_bytes_raw())
    first, fresh = releases.encrypt_to(live, plan([v1], {1: shares_of(v1)}, set(), 10))
    again, none_new = releases.encrypt_to(live, plan([v1], {1: shares_of(v1)}, set(), 10))
    assert unwrapped == [(1, 0), (1, 1)]
    assert (fresh, none_new, again) == (first, [], first)
    info = protocol.share_info("r-1", CLUSTER, 1, 0)
    assert HPKE.decrypt(protocol.b64d(first[0].sealed_share), peer, info=info) == b"words of slot 0"


def test_an_approval_releases_only_the_new_share() -> None:
    releases = Releases(lambda share: "words")
    v1 = version(1, 2, ("auto", "alice"))
    live = request(key=X25519PrivateKey.generate().public_key().public_bytes_raw())
    releases.encrypt_to(live, plan([v1], {1: shares_of(v1)}, set(), 10))
    shares, fresh = releases.encrypt_to(live, plan([v1], {1: shares_of(v1)}, {"alice"}, 10))
    assert [s.holder for s in shares] == ["auto", "alice"]
    assert [s.holder for s in fresh] == ["alice"]


def test_a_forgotten_request_is_encrypted_anew() -> None:
    count = 0

    def unwrap(share: ShareRecord) -> str:
        nonlocal count
        count += 1
        return "words"

    releases = Releases(unwrap)
    v1 = version(1, 1, ("auto",))
    live = request(key=X25519PrivateKey.generate().public_key().public_bytes_raw())
    releases.encrypt_to(live, plan([v1], {1: shares_of(v1)}, set(), 10))
    releases.forget("r-1")
    releases.encrypt_to(live, plan([v1], {1: shares_of(v1)}, set(), 10))
    assert count == 2
