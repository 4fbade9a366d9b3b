from __future__ import annotations

import base64
import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from escrow.core import unlockkey
from escrow.core.errors import InputError
from escrow.core.unlockkey import UnlockKey


def fresh_key_text() -> str:
    return "SWMKEY-1-" + base64.b64encode(os.urandom(32)).decode().rstrip("=")


def test_parse_accepts_a_docker_unlock_key_and_round_trips() -> None:
    text = fresh_key_text()
    key = unlockkey.parse(text + "\n")
    assert key.swmkey() == text
    assert len(key.kek) == 32


@pytest.mark.parametrize(("text", "expected"), [
    ("", "empty"),
    ("SWMKEY-2-" + "A" * 43, "does not start with SWMKEY-1-"),
    ("SWMKEY-1-" + "A" * 42, "has 42 characters"),
    ("SWMKEY-1-" + "A" * 44, "has 44 characters"),
    ("SWMKEY-1-" + "*" * 43, "not base64"),
    ("SWMKEY-1-" + "A" * 42 + "B", "not canonically encoded"),
])
def test_parse_rejects_malformed_keys_with_a_reason_and_a_hint(text: str, expected: str) -> None:
    with pytest.raises(InputError) as caught:
        unlockkey.parse(text)
    assert expected in caught.value.message
    assert "docker swarm unlock-key" in caught.value.hint


def test_error_messages_never_echo_the_input() -> None:
    secretish = "SWMKEY-1-" + base64.b64encode(os.urandom(32)).decode()[:41] + "!!"
    with pytest.raises(InputError) as caught:
        unlockkey.parse(secretish)
    assert secretish[9:30] not in caught.value.diagnostics()


def test_repr_and_str_never_show_the_key() -> None:
    key = unlockkey.parse(fresh_key_text())
    body = key.swmkey()[9:]
    assert body not in repr(key)
    assert body not in str(key)
    assert body not in f"{key!r} {[key]}"


def test_fingerprint_is_stable_scoped_to_the_cluster_and_not_the_plain_hash() -> None:
    key = UnlockKey(bytes(range(32)))
    assert key.fingerprint("a" * 25) == key.fingerprint("a" * 25)
    assert key.fingerprint("a" * 25) != key.fingerprint("b" * 25)
    assert key.fingerprint("a" * 25) != hashlib.sha256(key.kek).hexdigest()


def test_equality_compares_keys() -> None:
    assert UnlockKey(bytes(32)) == UnlockKey(bytes(32))
    assert UnlockKey(bytes(32)) != UnlockKey(bytes(31) + b"\x01")


@given(st.text())
def test_parse_of_arbitrary_text_raises_only_input_error(text: str) -> None:
    try:
        key = unlockkey.parse(text)
    except InputError:
        return
    assert key.swmkey() == text.strip()
