"""The server's hold on its token: how often it tries again, and what it never retries."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from escrow.core.errors import HsmError, TokenNotFound, TokenUnavailable, WrongPin
from escrow.server.hsmlink import HsmLink, Session


class FakeToken:
    def __init__(self) -> None:
        self.broken = False
        self.closed = False

    def check(self) -> None:
        pass

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        if self.broken:
            raise TokenUnavailable("the token 'escrow' stopped answering", "bring it back")
        return plaintext[::-1]

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return wrapped[::-1]

    def close(self) -> None:
        self.closed = True


class Opener:
    """Fails with the queued errors, then opens fake tokens; records each reinitialize flag."""

    def __init__(self, *failures: HsmError) -> None:
        self.failures = list(failures)
        self.calls: list[bool] = []
        self.tokens: list[FakeToken] = []

    def __call__(self, reinitialize: bool) -> Session:
        self.calls.append(reinitialize)
        if self.failures:
            raise self.failures.pop(0)
        self.tokens.append(FakeToken())
        return self.tokens[-1]


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def link(opener: Opener, clock: Clock) -> HsmLink:
    histogram = Histogram("h", "h", registry=CollectorRegistry())
    return HsmLink(opener, "escrow", histogram, retry_seconds=2.0, clock=clock)


def test_a_missing_token_is_tried_again_only_after_the_retry_interval_then_reopened() -> None:
    clock, opener = Clock(), Opener(TokenNotFound("no token labelled 'escrow'", ""))
    hsm = link(opener, clock)
    with pytest.raises(TokenNotFound):
        hsm.wrap(b"abc", b"")
    clock.now += 1.0
    with pytest.raises(TokenNotFound):  # the same error, without asking the module again
        hsm.wrap(b"abc", b"")
    assert opener.calls == [False]
    clock.now += 1.5
    assert hsm.unwrap(hsm.wrap(b"abc", b""), b"") == b"abc"
    assert opener.calls == [False, True]  # the second login restarts the module


def test_a_token_that_stops_answering_is_dropped_and_reopened_after_the_interval() -> None:
    clock, opener = Clock(), Opener()
    hsm = link(opener, clock)
    hsm.wrap(b"abc", b"")
    opener.tokens[0].broken = True
    with pytest.raises(TokenUnavailable):
        hsm.wrap(b"abc", b"")
    assert opener.tokens[0].closed
    with pytest.raises(TokenUnavailable):
        hsm.token()
    clock.now += 2.0
    assert hsm.wrap(b"abc", b"") == b"cba"
    assert opener.calls == [False, True]


def test_a_refused_pin_is_never_tried_again_so_the_token_does_not_lock() -> None:
    clock, opener = Clock(), Opener(WrongPin("the token 'escrow' refused the PIN", ""))
    hsm = link(opener, clock)
    for _ in range(3):
        with pytest.raises(WrongPin):
            hsm.token()
        clock.now += 3600
    assert opener.calls == [False]
