"""What heartbeats say of a node (escrow.service.liveness), as pure logic: up or not, and
whether two machines carry its identity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from escrow.core.states import Liveness, LockState, RequestState
from escrow.core.timestamps import timestamp
from escrow.service.liveness import alive_alongside, convicted, holder_of, is_held, liveness
from escrow.store import HeartbeatRecord, RequestRecord

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
A, B = "a" * 8 + "-aaaa-4aaa-8aaa-" + "a" * 12, "b" * 8 + "-bbbb-4bbb-8bbb-" + "b" * 12


def beat(boot: str, ago: float, *, first_ago: float | None = None,
         state: LockState = LockState.UNLOCKED, goodbye: bool = False,
         interval: int = 30) -> HeartbeatRecord:
    first = ago if first_ago is None else first_ago
    return HeartbeatRecord("c", "n", boot, timestamp(NOW - timedelta(seconds=first)),
                           timestamp(NOW - timedelta(seconds=ago)), state, "", "0.1.0", 100,
                           interval, goodbye, "10.0.0.1")


def request(boot: str, held_for: float | None) -> RequestRecord:
    held = "" if held_for is None else timestamp(NOW + timedelta(seconds=held_for))
    return RequestRecord("r-1", "c", "n", "host", boot, "10.0.0.2", "pem", b"k", "",
                         timestamp(NOW), timestamp(NOW + timedelta(minutes=10)),
                         RequestState.PENDING, held_until=held)


def test_a_node_is_what_its_last_beat_says_until_three_beats_are_missed() -> None:
    assert liveness(beat(A, 10), NOW) == Liveness.UNLOCKED
    assert liveness(beat(A, 10, state=LockState.LOCKED), NOW) == Liveness.LOCKED
    assert liveness(beat(A, 89), NOW) == Liveness.UNLOCKED
    assert liveness(beat(A, 91), NOW) == Liveness.UNREACHABLE


def test_a_node_that_never_beat_or_said_goodbye_is_unreachable() -> None:
    assert liveness(None, NOW) == Liveness.UNREACHABLE
    assert liveness(beat(A, 1, goodbye=True), NOW) == Liveness.UNREACHABLE


def test_a_request_from_a_new_boot_waits_on_the_old_boot_still_beating_unlocked() -> None:
    assert holder_of([beat(A, 20)], B, NOW) == beat(A, 20)


def test_a_request_waits_on_no_one_after_a_goodbye_a_silence_or_a_locked_beat() -> None:
    assert holder_of([beat(A, 5, goodbye=True)], B, NOW) is None
    assert holder_of([beat(A, 61)], B, NOW) is None
    assert holder_of([beat(A, 5, state=LockState.LOCKED)], B, NOW) is None
    assert holder_of([], B, NOW) is None


def test_a_copy_that_beat_before_asking_still_waits_on_the_original() -> None:
    # The copy's agent beats "locked" first, then asks: the original's beat still counts.
    copy_first = [beat(B, 1, state=LockState.LOCKED), beat(A, 4)]
    assert holder_of(copy_first, B, NOW) == beat(A, 4)


def test_a_request_from_the_only_boot_beating_waits_on_no_one() -> None:
    assert holder_of([beat(A, 5)], A, NOW) is None
    assert holder_of([beat(A, 5), beat(B, 100)], A, NOW) is None


def test_a_boot_that_beat_after_another_began_is_alive_alongside_it() -> None:
    current = beat(B, 0, first_ago=60)
    assert alive_alongside([beat(A, 10, first_ago=600)], current) is not None


def test_a_crash_followed_by_a_reboot_is_no_clone() -> None:
    # A's last beat came before B's first: the machine went down, then came back as B.
    assert alive_alongside([beat(A, 70, first_ago=900)], beat(B, 0, first_ago=60)) is None
    assert alive_alongside([beat(A, 70, first_ago=900)], beat(B, 0)) is None


def test_a_boot_that_said_goodbye_or_fell_silent_is_not_alongside() -> None:
    current = beat(B, 0, first_ago=600)
    assert alive_alongside([beat(A, 10, first_ago=900, goodbye=True)], current) is None
    assert alive_alongside([beat(A, 100, first_ago=900)], beat(B, 0, first_ago=600)) is None


def test_a_held_request_from_another_boot_is_convicted_by_a_beat_within_the_hold() -> None:
    held = request(B, held_for=10)
    assert convicted([held], beat(A, 0), NOW) == [held]
    assert convicted([held], beat(B, 0), NOW) == []
    assert convicted([request(B, held_for=None)], beat(A, 0), NOW) == []
    assert convicted([request(B, held_for=-1)], beat(A, 0), NOW) == []


def test_a_hold_ends_at_its_time() -> None:
    assert is_held(request(B, held_for=1), NOW)
    assert not is_held(request(B, held_for=0), NOW)
    assert not is_held(request(B, held_for=None), NOW)
