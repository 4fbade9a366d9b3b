"""Freshness: server nonces that cost nothing to issue.

A nonce is ``expiry (8 bytes, ms) || random (16) || HMAC-SHA256 tag (8)`` under a secret the
escrow keeps wrapped by the token, the same for every replica, so a nonce one replica issued is
good at any other. Issuing one stores nothing, so a flood of ``POST /v1/nonce`` costs neither
memory nor a write.
Single use is enforced only once a request's signature has been checked (``Store.use_once``,
shared by the replicas): the set of used nonces then grows with what identified callers did,
not with what anyone sent.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from escrow.core.encoding import encode

NONCE_TTL = timedelta(minutes=2)
NONCE_SIZE = 32
# How far the clocks of two replicas may disagree before one refuses the other's nonces.
REPLICA_SKEW = timedelta(seconds=5)
_STAMP, _RANDOM, _TAG = 8, 16, 8
_DOMAIN = "swarm-unseal/v1/nonce"


def millis(moment: datetime) -> int:
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
        body = millis(expires).to_bytes(_STAMP, "big") + secrets.token_bytes(_RANDOM)
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
        # A stamp further ahead than one lifetime was not made by a replica's clock (or the
        # secret leaked); either way it is not fresh.
        if not now < expires <= now + NONCE_TTL + REPLICA_SKEW:
            return None
        return expires
