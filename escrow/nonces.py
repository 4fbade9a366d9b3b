"""Freshness: server nonces that cost nothing to issue, and single-use guards for signed requests.

A nonce is ``expiry (8 bytes, ms) || random (16) || HMAC-SHA256 tag (8)`` under a secret (the
service derives it from one the escrow keeps wrapped by the token and one of its process's
start). Issuing one stores nothing, so a flood of ``POST /v1/nonce`` costs neither memory nor a
table scan.
Single use is enforced only once a request's signature has been checked (:class:`SeenOnce`):
the set of used nonces then grows with what identified callers did, not with what anyone sent.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from escrow.core.encoding import encode

NONCE_TTL = timedelta(minutes=2)
NONCE_SIZE = 32
_STAMP, _RANDOM, _TAG = 8, 16, 8
_DOMAIN = "swarm-unseal/v1/nonce"


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class NonceMinter:
    def __init__(self, secret: bytes, clock: Callable[[], datetime]) -> None:
        if len(secret) < 32:
            raise ValueError("the nonce secret must be at least 32 bytes")
        self._secret = secret
        self._clock = clock

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._secret, encode(_DOMAIN, body), hashlib.sha256).digest()[:_TAG]

    def issue(self) -> tuple[bytes, datetime]:
        expires = self._clock() + NONCE_TTL
        body = _millis(expires).to_bytes(_STAMP, "big") + secrets.token_bytes(_RANDOM)
        return body + self._tag(body), expires

    def expiry(self, nonce: bytes) -> datetime | None:
        """When an authentic, unexpired nonce expires; None for anything else."""
        if len(nonce) != NONCE_SIZE:
            return None
        body, tag = nonce[:-_TAG], nonce[-_TAG:]
        if not hmac.compare_digest(self._tag(body), tag):
            return None
        expires = datetime.fromtimestamp(int.from_bytes(body[:_STAMP], "big") / 1000, tz=UTC)
        now = self._clock()
        # A stamp further ahead than one lifetime was not made by this clock (or the secret
        # leaked); either way it is not fresh.
        if not now < expires <= now + NONCE_TTL + timedelta(seconds=1):
            return None
        return expires


class SeenOnce:
    """Keys seen before their expiry. Each call costs O(1) amortised: entries leave in expiry
    order from a queue. Bounded: when full, :meth:`first_time` refuses rather than forgets,
    because forgetting a live entry would let it be replayed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._expiry: dict[bytes, datetime] = {}
        self._queue: deque[tuple[datetime, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._expiry)

    def _expire(self, now: datetime) -> None:
        while self._queue and self._queue[0][0] <= now:
            _, key = self._queue.popleft()
            self._expiry.pop(key, None)

    def full(self, now: datetime) -> bool:
        self._expire(now)
        return len(self._expiry) >= self.capacity

    def first_time(self, key: bytes, expires: datetime, now: datetime) -> bool:
        """Record ``key`` until ``expires``; False if it was already recorded or the guard is
        full. Expiries are expected in non-decreasing order (one lifetime for every key)."""
        self._expire(now)
        if key in self._expiry or len(self._expiry) >= self.capacity:
            return False
        self._expiry[key] = expires
        if self._queue and self._queue[-1][0] > expires:
            # A clock step backwards: keep the queue ordered at the price of one rebuild.
            self._queue = deque(sorted([*self._queue, (expires, key)]))
        else:
            self._queue.append((expires, key))
        return True
