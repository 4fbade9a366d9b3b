"""Swarm unlock keys: parsing, formatting and fingerprints (pure).

A Swarm unlock key is ``SWMKEY-1-`` followed by the unpadded standard base64 of the 32-byte
key-encryption key (KEK) that protects the manager's Raft log and TLS key
(docs/threat-model.md, "What autolock protects").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from escrow.core.encoding import FINGERPRINT_DOMAIN, encode
from escrow.core.errors import InputError

PREFIX = "SWMKEY-1-"
KEK_BYTES = 32
_B64_LEN = 43  # unpadded base64 of 32 bytes

_FORM_HINT = (
    "an unlock key looks like SWMKEY-1- followed by 43 base64 characters; "
    "print the current one on an unlocked manager with `docker swarm unlock-key -q`"
)


class UnlockKey:
    """The KEK of one swarm. Its repr never shows the key, so it cannot leak into a log."""

    __slots__ = ("_kek",)

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEK_BYTES:
            raise InputError(
                f"an unlock key must hold {KEK_BYTES} bytes, this one holds {len(kek)}",
                _FORM_HINT,
            )
        self._kek = bytes(kek)

    @property
    def kek(self) -> bytes:
        return self._kek

    def swmkey(self) -> str:
        """The key in the form `docker swarm unlock` takes. Handle the result as a secret."""
        return PREFIX + base64.b64encode(self._kek).decode("ascii").rstrip("=")

    def fingerprint(self, cluster_id: str) -> str:
        """Domain-separated SHA-256 of the KEK, scoped to a cluster: identifies a key version
        without revealing anything about the key."""
        return hashlib.sha256(encode(FINGERPRINT_DOMAIN, cluster_id, self._kek)).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnlockKey):
            return NotImplemented
        return hmac.compare_digest(self._kek, other._kek)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._kek).digest())

    def __repr__(self) -> str:
        return "UnlockKey(<redacted>)"

    __str__ = __repr__


def parse(text: str) -> UnlockKey:
    """Parse ``SWMKEY-1-...``. Errors describe the form, never echo the input."""
    candidate = text.strip()
    if not candidate:
        raise InputError("no unlock key was given (the input is empty)", _FORM_HINT)
    if not candidate.startswith(PREFIX):
        raise InputError("the input does not start with SWMKEY-1-", _FORM_HINT)
    body = candidate[len(PREFIX) :]
    if len(body) != _B64_LEN:
        raise InputError(
            f"the unlock key has {len(body)} characters after SWMKEY-1-, expected {_B64_LEN}",
            _FORM_HINT,
        )
    try:
        kek = base64.b64decode(body + "=", altchars=None, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            "the unlock key contains characters that are not base64", _FORM_HINT
        ) from None
    key = UnlockKey(kek)
    # Reject non-canonical encodings (stray low bits in the last character): Docker never makes
    # them, so one means the key was mistyped.
    if not hmac.compare_digest(key.swmkey(), candidate):
        raise InputError("the unlock key is not canonically encoded (mistyped?)", _FORM_HINT)
    return key
