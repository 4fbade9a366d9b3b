from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import shamir_mnemonic
from hypothesis import given, settings
from hypothesis import strategies as st

from escrow.core import shares
from escrow.core.errors import RecoveryError
from escrow.core.unlockkey import UnlockKey


def random_key() -> UnlockKey:
    return UnlockKey(os.urandom(32))


@pytest.mark.parametrize(("threshold", "count"), [(1, 1), (1, 3), (2, 2), (2, 5), (3, 5),
                                                  (5, 16), (16, 16)])
def test_any_threshold_of_shares_rebuilds_the_key(threshold: int, count: int) -> None:
    key = random_key()
    mnemonics = shares.split(key, threshold, count)
    assert len(mnemonics) == count
    assert len(set(mnemonics)) == count
    assert shares.combine(mnemonics[:threshold]) == key
    assert shares.combine(list(reversed(mnemonics))[:threshold]) == key


def test_more_shares_than_needed_still_combine() -> None:
    key = random_key()
    mnemonics = shares.split(key, 2, 5)
    assert shares.combine(mnemonics) == key


def test_too_few_shares_say_how_many_are_missing() -> None:
    mnemonics = shares.split(random_key(), 3, 5)
    with pytest.raises(RecoveryError,
                       match=r"too few shares; still missing 1 more share \(2 of 3 given\)"):
        shares.combine(mnemonics[:2])


def test_the_same_share_twice_counts_once() -> None:
    mnemonics = shares.split(random_key(), 2, 3)
    with pytest.raises(RecoveryError, match=r"1 more share \(1 of 2 given\)"):
        shares.combine([mnemonics[0], mnemonics[0]])


def test_shares_of_different_keys_are_refused_and_named() -> None:
    first = shares.split(random_key(), 2, 3)
    second = shares.split(random_key(), 2, 3)
    with pytest.raises(RecoveryError, match="share 2 belongs to a different key than share 1"):
        shares.combine([first[0], second[1]])


def test_a_set_in_groups_from_another_slip39_tool_rebuilds_the_key_in_any_order() -> None:
    key = random_key()
    first, second, third = shamir_mnemonic.generate_mnemonics(2, [(2, 3), (3, 5), (1, 1)],
                                                              key.kek)
    assert shares.combine([second[4], first[1], second[0], first[2], second[2]]) == key
    assert shares.combine([third[0], first[0], first[1]]) == key
    assert shares.combine([*first, *second, *third]) == key


def test_a_set_in_groups_says_what_is_still_missing_group_by_group() -> None:
    first, second, _ = shamir_mnemonic.generate_mnemonics(2, [(2, 3), (3, 5), (1, 1)],
                                                          os.urandom(32))
    state = shares.ShareSet()
    assert state.missing() == "the first share"
    state.add(shares.parse_share(second[3], "line 1"))
    assert state.missing() == ("2 more complete group(s) of 3, 2 needed: 2 more shares of "
                               "group 2; groups 1, 3 not started")
    state.add(shares.parse_share(first[0], "line 2"))
    state.add(shares.parse_share(second[0], "line 3"))
    state.add(shares.parse_share(second[1], "line 4"))
    assert state.missing() == "1 more complete group(s) of 3, 2 needed: 1 more share of group 1; " \
        "group 3 not started"
    with pytest.raises(RecoveryError, match="still missing 1 more complete group"):
        state.key()
    state.add(shares.parse_share(first[2], "line 5"))
    assert (state.complete, state.missing()) == (True, "")


def test_the_master_scheme_rebuilds_from_its_one_master_share() -> None:
    key = random_key()
    (master,), _ = shamir_mnemonic.generate_mnemonics(1, [(1, 1), (3, 5)], key.kek)
    assert shares.combine([master]) == key


def test_two_different_shares_in_one_place_are_refused_and_both_named() -> None:
    key = random_key()
    (one,) = shamir_mnemonic.generate_mnemonics(1, [(2, 3)], key.kek)
    (other,) = shamir_mnemonic.generate_mnemonics(1, [(2, 3)], key.kek)
    first = shamir_mnemonic.Share.from_mnemonic(one[0])
    forged = dataclasses.replace(shamir_mnemonic.Share.from_mnemonic(other[0]),
                                 identifier=first.identifier)
    with pytest.raises(RecoveryError, match="share 2 and share 1 are both share 1 of group 1"):
        shares.combine([one[0], forged.mnemonic()])


def test_a_share_of_the_same_key_from_a_split_with_other_groups_is_refused() -> None:
    key = random_key()
    (one,) = shamir_mnemonic.generate_mnemonics(1, [(2, 3)], key.kek)
    first = shamir_mnemonic.Share.from_mnemonic(one[0])
    forged = dataclasses.replace(first, group_count=2, group_threshold=2, group_index=1)
    with pytest.raises(RecoveryError, match="share 2 is of the same key as share 1 but its group"):
        shares.combine([one[0], forged.mnemonic()])


def test_a_mistyped_word_is_named_with_its_position_and_a_suggestion() -> None:
    words = shares.split(random_key(), 2, 3)[0].split()
    original = words[6]
    words[6] = original[:-1] + ("x" if original[-1] != "x" else "y")
    with pytest.raises(RecoveryError) as caught:
        shares.parse_share(" ".join(words), "line 4")
    message = caught.value.message
    assert message.startswith(f"line 4, word 7: {words[6]!r} is not a SLIP-39 word")
    assert "did you mean" in message


def test_a_swapped_valid_word_fails_the_checksum_without_echoing_the_share() -> None:
    mnemonic = shares.split(random_key(), 2, 3)[0]
    words = mnemonic.split()
    words[10], words[11] = words[11], words[10]
    if words[10] == words[11]:
        pytest.skip("identical neighbouring words")
    with pytest.raises(RecoveryError) as caught:
        shares.parse_share(" ".join(words), "share 1")
    assert "checksum" in caught.value.message
    assert " ".join(words[3:8]) not in caught.value.diagnostics()


def test_split_refuses_impossible_thresholds() -> None:
    with pytest.raises(ValueError, match="threshold"):
        shares.split(random_key(), 3, 2)
    with pytest.raises(ValueError, match="threshold"):
        shares.split(random_key(), 2, 17)


@settings(max_examples=200)
@given(st.text())
def test_parsing_arbitrary_text_raises_only_recovery_error(text: str) -> None:
    with contextlib.suppress(RecoveryError):
        shares.parse_share(text, "input")
