"""The agent's decisions (agent/decision.py), one branch each: answers are built by hand, the
clock is a number and the back-off's jitter a seeded generator, so nothing here waits or
connects."""

from __future__ import annotations

import random

import pytest

from agent.backoff import Backoff
from agent.decision import Answer, Kind, Reason, Step, Tried, decide
from agent.errors import EscrowRejected, EscrowUnavailable, SharesUnusable
from agent.log import Level, Topic
from escrow.core.protocol import ReleasedShare, RequestState, RequestStatus

NOW = 1000.0
REFUSED_RETRY = 300.0
CAP = 60.0


def share(version: int, slot: int) -> ReleasedShare:
    return ReleasedShare(version=version, fingerprint=f"fp-{version}", slot=slot,
                         holder="auto", sealed_share="AAAA")


def status(state: RequestState = "pending", needed: int = 0,
           releases: tuple[ReleasedShare, ...] = (), denial_reason: str = "") -> RequestStatus:
    return RequestStatus(request_id="r-1", cluster_id="c" * 25, node_id="n" * 25, state=state,
                         created_at="2026-12-01T10:00:00Z", expires_at="2026-12-01T10:15:00Z",
                         threshold=2, needed=needed, approvals=[], denial_reason=denial_reason,
                         releases=list(releases))


def refusal_backoff() -> Backoff:
    """The unseal flow's back-off after refusals, with a seeded jitter."""
    return Backoff(first=2.0, cap=REFUSED_RETRY, rng=random.Random(1))


def step(answer: Answer, refused: frozenset[int] = frozenset(), request_id: str = "",
         backoff: Backoff | None = None, refusals: Backoff | None = None) -> Step:
    return decide(answer, refused, NOW, backoff=backoff or Backoff(cap=CAP, rng=random.Random(1)),
                  refusals=refusals or refusal_backoff(), refused_retry=REFUSED_RETRY,
                  request_id=request_id)


def messages(decided: Step) -> list[str]:
    return [line.message % line.args for line in decided.lines]


def test_a_ready_request_tries_the_keys_newest_first_skipping_refused_versions() -> None:
    ready = status("ready", releases=(share(1, 1), share(1, 2), share(3, 1), share(2, 1),
                                      share(3, 2)))
    decided = step(ready, refused=frozenset({2}))
    assert (decided.kind, decided.versions) == (Kind.TRY_KEYS, (3, 1))
    assert (decided.status, decided.lines, decided.drop_key) == ("", (), False)


def test_a_pending_request_with_no_share_yet_polls_and_says_what_it_waits_for() -> None:
    decided = step(status(needed=2))
    assert decided.kind is Kind.POLL
    assert decided.status == ("locked, waiting for 2 more approvals (request r-1, expires "
                              "2026-12-01T10:15:00Z)")
    (line,) = decided.lines
    assert (line.level, line.once, line.request_id) == (Level.INFO, Topic.WAITING, "r-1")
    assert messages(decided) == ["waiting for 2 more approval(s) of request r-1"]


def test_a_request_the_escrow_holds_back_polls_and_says_it_is_held_not_awaiting_approvals(
        ) -> None:
    decided = step(status(needed=0))
    assert decided.kind is Kind.POLL
    assert "holds request r-1 back" in decided.status
    assert "approval" not in decided.status
    assert messages(decided)[0].startswith("the escrow holds request r-1 back")


def test_the_keys_of_one_answer_are_tried_once_even_if_none_combined() -> None:
    incomplete = status(needed=1, releases=(share(1, 1),))
    assert step(incomplete).kind is Kind.TRY_KEYS
    decided = step(Tried(incomplete))
    assert decided.kind is Kind.POLL
    assert decided.status.startswith("locked, waiting for 1 more approval (request r-1")


def test_an_older_version_refused_while_the_newest_waits_keeps_waiting_for_custodians() -> None:
    waiting = status(needed=1, releases=(share(2, 1), share(1, 1), share(1, 2)))
    assert step(waiting).versions == (2, 1)
    decided = step(Tried(waiting, frozenset({1})), refused=frozenset({1}))
    assert decided.kind is Kind.POLL
    assert messages(decided) == [
        "key version(s) 1 do not unlock this manager; waiting for approvals of the newest "
        "version", "waiting for 1 more approval(s) of request r-1"]
    # The next answer, with the newest version complete, offers only that one.
    ready = status("ready", releases=(share(2, 1), share(2, 2), share(1, 1), share(1, 2)))
    assert step(ready, refused=frozenset({1})).versions == (2,)


def test_when_every_version_is_refused_it_gives_up_naming_them() -> None:
    ready = status("ready", releases=(share(2, 1), share(2, 2), share(1, 1), share(1, 2)))
    decided = step(Tried(ready, frozenset({2, 1})), refused=frozenset({1, 2}))
    assert (decided.kind, decided.reason) == (Kind.GIVE_UP, Reason.NO_VERSION_UNLOCKS)
    assert decided.until == NOW + REFUSED_RETRY
    assert decided.status == ("locked; no escrowed key version unlocks this manager "
                              "(request r-1)")
    (line,) = decided.lines
    assert line.level is Level.ERROR
    assert messages(decided)[0].startswith("none of the escrowed key versions (2, 1) unlocks")


def test_a_denied_request_gives_up_until_the_refusal_wait_and_shows_the_reason_as_text() -> None:
    refusals = refusal_backoff()
    decided = step(status("denied", needed=2, denial_reason="not now\x1b[2K"),
                   refusals=refusals)
    assert (decided.kind, decided.reason) == (Kind.GIVE_UP, Reason.DENIED)
    assert decided.until == NOW + REFUSED_RETRY
    assert refusals.failures == 0  # a person's denial is not retried sooner
    assert decided.status == "locked; request r-1 was denied, asking again in 300 s"
    assert messages(decided) == [
        "a custodian denied unseal request r-1: not now\\x1b[2K; asking again in 300 s"]


@pytest.mark.parametrize("state", ["expired", "superseded", "completed"])
def test_a_request_that_ended_before_a_quorum_is_asked_again_at_once(
        state: RequestState) -> None:
    decided = step(status(state, needed=1))
    assert (decided.kind, decided.reason, decided.until) == (Kind.NEW_REQUEST, Reason.ENDED, NOW)
    assert messages(decided) == [
        f"unseal request r-1 ended ({state}) before a quorum; asking again"]


def test_a_node_revoked_while_its_request_waits_gives_up_and_asks_again_within_seconds(
        ) -> None:
    decided = step(status("revoked", needed=1))
    assert (decided.kind, decided.reason) == (Kind.GIVE_UP, Reason.REVOKED)
    assert NOW + 1.0 <= decided.until <= NOW + 2.0
    assert decided.status == "locked; this node is revoked at the escrow"
    assert "escrow node allow" in messages(decided)[0]


def test_a_revoked_node_is_refused_its_request_and_drops_its_agent_key() -> None:
    refusal = EscrowRejected(403, "revoked", "node n is revoked", "ask an admin")
    decided = step(refusal)
    assert (decided.kind, decided.reason) == (Kind.GIVE_UP, Reason.REFUSED)
    assert NOW + 1.0 <= decided.until <= NOW + 2.0
    assert decided.drop_key
    assert decided.status == ("locked; the escrow refused this node (revoked); asking again in "
                              f"{decided.until - NOW:.0f} s")
    (line,) = decided.lines
    assert (line.level, line.once) == (Level.ERROR, Topic.REFUSED)
    assert messages(decided) == ["cannot unseal: the escrow refused (403 revoked): node n is "
                                 "revoked (ask an admin)"]


@pytest.mark.parametrize("refusal", [
    EscrowRejected(403, "revoked", "node n is revoked"),
    EscrowRejected(409, "quarantined", "node n looks cloned"),
])
def test_refusals_are_asked_again_after_two_seconds_then_twice_as_long_up_to_the_refusal_wait(
        refusal: EscrowRejected) -> None:
    refusals = refusal_backoff()
    steps = [step(refusal, refusals=refusals) for _ in range(12)]
    waits = [decided.until - NOW for decided in steps]
    doubling = [min(REFUSED_RETRY, 2.0 * 2 ** failures) for failures in range(12)]
    assert doubling[:3] == [2.0, 4.0, 8.0]
    assert doubling[-1] == REFUSED_RETRY
    # Half of each step is fixed, half jitter, so thousands of refused nodes spread out.
    assert all(full / 2 <= wait <= full for wait, full in zip(waits, doubling, strict=True))
    assert {decided.kind for decided in steps} == {Kind.GIVE_UP}
    refusals.reset()  # what the unseal flow does once the escrow accepts a request
    assert step(refusal, refusals=refusals).until <= NOW + 2.0


def test_a_rate_limited_node_comes_back_with_the_back_off_within_the_refusal_wait() -> None:
    limited = EscrowRejected(429, "source_rate_limited", "too many requests")
    refusals = refusal_backoff()
    decided = step(limited, backoff=Backoff(first=1.0, cap=CAP, rng=random.Random(1)),
                   refusals=refusals)
    assert (decided.kind, decided.reason) == (Kind.NEW_REQUEST, Reason.RATE_LIMITED)
    assert NOW + 0.5 <= decided.until <= NOW + 1.0
    assert decided.drop_key
    assert refusals.failures == 0  # a rate limit is no refusal of the node
    long_backoff = Backoff(first=1.0, cap=10 * REFUSED_RETRY, failures=20)
    assert step(limited, backoff=long_backoff).until == NOW + REFUSED_RETRY


def test_an_unreachable_escrow_is_asked_again_with_back_off_never_beyond_the_cap() -> None:
    backoff = Backoff(first=1.0, cap=CAP, rng=random.Random(1))
    down = EscrowUnavailable("the escrow at https://escrow is unreachable")
    waits = []
    for _ in range(12):
        decided = step(down, backoff=backoff)
        assert (decided.kind, decided.reason) == (Kind.NEW_REQUEST, Reason.ESCROW_DOWN)
        waits.append(decided.until - NOW)
    assert waits[0] <= 1.0 < waits[3]
    assert all(wait <= CAP for wait in waits)
    assert decided.status == f"locked; escrow unreachable, retrying in {waits[-1]:.0f} s"
    (line,) = decided.lines
    assert (line.level, line.once, line.request_id) == (Level.WARNING, Topic.ESCROW_DOWN, "")


def test_an_unreachable_escrow_while_polling_waits_then_polls_the_same_request() -> None:
    decided = step(EscrowUnavailable("the escrow cannot serve now (503)"), request_id="r-1")
    assert (decided.kind, decided.reason) == (Kind.WAIT, Reason.ESCROW_DOWN)
    assert NOW < decided.until <= NOW + 1.0
    assert decided.status.startswith("locked; escrow unreachable (request r-1), retrying in")


def test_a_request_the_escrow_no_longer_knows_is_asked_anew_at_once() -> None:
    decided = step(EscrowRejected(404, "unknown_request", "no such request"), request_id="r-1")
    assert (decided.kind, decided.reason, decided.until) == (
        Kind.NEW_REQUEST, Reason.FORGOTTEN, NOW)
    assert not decided.drop_key
    assert messages(decided) == ["the escrow no longer knows request r-1 (the escrow refused "
                                 "(404 unknown_request): no such request); asking again"]


def test_unusable_shares_are_asked_again_after_the_back_off() -> None:
    unusable = SharesUnusable("a share of version 1 (slot 1) did not decrypt",
                              "the answer was altered")
    decided = step(unusable, request_id="r-1")
    assert (decided.kind, decided.reason) == (Kind.NEW_REQUEST, Reason.SHARES_UNUSABLE)
    assert NOW < decided.until <= NOW + 1.0
    assert decided.status == ("locked; the escrow's shares were unusable (request r-1), asking "
                              "again later")
    assert messages(decided) == ["a share of version 1 (slot 1) did not decrypt (the answer "
                                 "was altered)"]
