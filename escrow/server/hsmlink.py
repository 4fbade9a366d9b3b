"""The server's hold on its token, which reopens it by itself after the token went away.

A token can vanish under a running escrow: a SoftHSM token directory on storage that was
unmounted, a network HSM that lost its link, a module file missing at boot. While it is gone
every use fails at once with the reason (the API answers 503 with it), and a use at least
``retry_seconds`` after the last failure logs in again, so the escrow recovers with no restart.
A refused PIN is the exception: retrying it would lock the token, so it fails for good.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Histogram

from escrow.core.errors import HsmError, TokenUnavailable, WrongPin
from escrow.core.hsm import HsmSettings, Pin
from escrow.wrapping import Token

log = logging.getLogger("escrow.server")


class Session(Protocol):
    def check(self) -> None: ...
    def wrap(self, plaintext: bytes, aad: bytes) -> bytes: ...
    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...
    def close(self) -> None: ...


def opener(settings: HsmSettings, pin: Pin) -> Callable[[bool], Session]:
    """Log in to the configured token; the flag restarts the module first."""
    return lambda reinitialize: Token(settings, pin, reinitialize=reinitialize)


class HsmLink:
    def __init__(self, open_token: Callable[[bool], Session], label: str,
                 histogram: Histogram, retry_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open_token = open_token
        self._label = label
        self._histogram = histogram
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._token: Session | None = None
        self._error: HsmError | None = None
        self._next_try = 0.0
        self._attempts = 0

    def token(self) -> Session:
        """The logged-in token, opening it again if it was lost. Raises the last HsmError
        while it stays unavailable."""
        if self._token is not None:
            return self._token
        if self._error is not None and self._clock() < self._next_try:
            raise self._error
        self._attempts += 1
        token: Session | None = None
        try:
            # After a first attempt the module is loaded and must be restarted to see a
            # token that came back.
            token = self._open_token(self._attempts > 1)
            token.check()
        except WrongPin as exc:
            self._lost(exc, retry=False)
            raise
        except HsmError as exc:
            if token is not None:
                token.close()
            self._lost(exc, retry=True)
            raise
        if self._error is not None:
            log.warning("the token %r answers again; serving", self._label)
        self._token, self._error = token, None
        return token

    def _lost(self, error: HsmError, *, retry: bool) -> None:
        if self._error is None or self._error.message != error.message:
            log.error("the token is unavailable: %s (%s)", error.message,
                      "retrying on the next request" if retry else "not retrying")
        self._error = error
        self._next_try = self._clock() + self._retry_seconds if retry else math.inf

    def _use(self, operation: Callable[[Session], bytes]) -> bytes:
        token = self.token()
        try:
            with self._histogram.time():
                return operation(token)
        except TokenUnavailable as exc:
            self._drop(exc)
            raise

    def problem(self) -> HsmError | None:
        """Why the token cannot be used now, or None when it can: it wraps and unwraps a
        test value (a lost token is opened again first, at the retry pace). On the vault
        thread."""
        try:
            token = self.token()
            try:
                # Not timed: escrow_hsm_seconds is the work's, not the probes'.
                token.unwrap(token.wrap(b"health", b"health"), b"health")
            except TokenUnavailable as exc:
                self._drop(exc)
                return exc
        except HsmError as exc:
            return exc
        return None

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        return self._use(lambda token: token.wrap(plaintext, aad))

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return self._use(lambda token: token.unwrap(wrapped, aad))

    def _drop(self, error: TokenUnavailable) -> None:
        if self._token is not None:
            self._token.close()
            self._token = None
        self._lost(error, retry=True)

    def close(self) -> None:
        if self._token is not None:
            self._token.close()
            self._token = None
