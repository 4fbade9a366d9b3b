from __future__ import annotations

import pytest

from escrow.core.errors import PolicyError
from escrow.policy import make_policy, parse_slots, validate_custodian_name

PEOPLE = ["alice", "bob", "carol"]


def test_usual_production_policy_is_valid_and_paper_recoverable() -> None:
    policy = make_policy(2, parse_slots("auto,auto,alice,bob,carol"), PEOPLE)
    assert policy.slots.count("auto") == 2
    assert policy.custodians == ("alice", "bob", "carol")
    assert policy.paper_recoverable


def test_fully_automatic_policy_is_not_paper_recoverable() -> None:
    assert not make_policy(2, ["auto", "auto"], []).paper_recoverable


@pytest.mark.parametrize(("threshold", "slots", "message", "hint"), [
    (0, "auto,auto", "threshold 0 is outside 1..2", "choose --threshold"),
    (3, "auto,auto", "threshold 3 is outside 1..2", "or add slots"),
    (1, ",".join(["auto"] * 17), "between 1 and 16 slots", "--slots"),
    (2, "auto,dave", "unknown custodian(s): dave", "escrow custodian add"),
    (2, "alice,alice,bob", "holds more than one slot", "one slot"),
    (1, "auto,Alice", "neither 'auto' nor a valid custodian name", "lower-case"),
])
def test_invalid_policies_say_what_is_wrong_and_how_to_fix_it(
        threshold: int, slots: str, message: str, hint: str) -> None:
    with pytest.raises(PolicyError) as caught:
        make_policy(threshold, parse_slots(slots), PEOPLE)
    assert message in caught.value.message
    assert hint in caught.value.hint


def test_empty_slot_entries_are_refused() -> None:
    with pytest.raises(PolicyError, match="empty entry"):
        parse_slots("auto,,alice")


def test_auto_is_reserved_as_a_custodian_name() -> None:
    with pytest.raises(PolicyError, match="reserved"):
        validate_custodian_name("auto")
