"""When a delivery is tried again (pure): what a receiver's answer means, and the back-off.

Five attempts, each given :data:`ATTEMPT_TIMEOUT_SECONDS`, the waits between them doubling
from 2 s up to 30 s with up to 2 s of jitter each (2, 4, 8, 16 s and the jitter: a delivery
is given up within about a minute). A 2xx is delivered; a 5xx, a 408, a 429, a timeout or no
connection is tried again; any other answer, a redirect among them (never followed: the URL is
the operator's, and a 3xx sends the body elsewhere), is given up at once, since asking again
would get the same. The looping is tenacity's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

ATTEMPTS = 5
ATTEMPT_TIMEOUT_SECONDS = 5.0
FIRST_WAIT_SECONDS = 2.0
LONGEST_WAIT_SECONDS = 30.0
JITTER_SECONDS = 2.0
RETRIED_STATUSES = frozenset({408, 429})


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"


def verdict(status: int) -> Verdict:
    """What the receiver's HTTP status means for this delivery."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in RETRIED_STATUSES or status >= 500:
        return Verdict.RETRY
    return Verdict.GIVE_UP


class Failed(Exception):
    """An attempt that did not deliver; its message says why, for the log (never the URL)."""


class Retryable(Failed):
    pass


class Final(Failed):
    pass


def retrying(sleep: Callable[[float], Awaitable[None]]) -> AsyncRetrying:
    """The attempts of one delivery: raising :class:`Retryable` asks for another, until the
    last, which re-raises it; :class:`Final` ends them at once."""
    return AsyncRetrying(
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential_jitter(multiplier=FIRST_WAIT_SECONDS, max=LONGEST_WAIT_SECONDS,
                                     jitter=JITTER_SECONDS),
        retry=retry_if_exception_type(Retryable), reraise=True, sleep=sleep)
