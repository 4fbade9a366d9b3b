from __future__ import annotations

import contextlib
import os

import pytest
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
    with pytest.raises(RecoveryError, match="too few shares: 2 given, 3 needed"):
        shares.combine(mnemonics[:2])


def test_the_same_share_twice_counts_once() -> None:
    mnemonics = shares.split(random_key(), 2, 3)
    with pytest.raises(RecoveryError, match="1 given, 2 needed"):
        shares.combine([mnemonics[0], mnemonics[0]])


def test_shares_of_different_keys_are_refused_and_named() -> None:
    first = shares.split(random_key(), 2, 3)
    second = shares.split(random_key(), 2, 3)
    with pytest.raises(RecoveryError, match="share 2 belongs to a different key than share 1"):
        shares.combine([first[0], second[1]])


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
