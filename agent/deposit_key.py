"""The escrow's deposit key, pinned by the agent: pure.

Deposits are encrypted to the X25519 key the escrow's `/v1/info` offers. TLS alone does not
make that key the escrow's: whoever holds the escrow's TLS private key (an old backup, a copy
of its disk) can answer `/v1/info` with a key of their own and decrypt the unlock key. So the
agent pins the deposit key: at enrollment it records the key the escrow it was pointed at
offers (trust on first use), or takes the fingerprint from `escrow_deposit_key_sha256`, and
every deposit checks the offered key against that pin before anything is encrypted.

A fingerprint is the SHA-256 of the raw 32-byte public key, in lower-case hex. Replicas of one
escrow share its deposit key, so one pin covers every URL of escrow_url; what a message here
names is the URL that offered the key.
"""

from __future__ import annotations

import hashlib
import hmac

from agent.errors import AgentError, DepositKeyMismatch, EscrowUnavailable
from escrow.core import protocol

FROM_CONFIG = "in escrow_deposit_key_sha256"
FROM_ENROLLMENT = "at enrollment"


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def offered_key(url: str, deposit_public_key: str) -> bytes:
    """The raw X25519 key of /v1/info's ``deposit_public_key``, or EscrowUnavailable."""
    try:
        raw = protocol.b64d(deposit_public_key)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise EscrowUnavailable(f"the escrow at {url} offers no valid deposit key",
                                "check that agent and escrow versions match")
    return raw


def pin_for(url: str, offered: bytes, *, configured: str = "", pinned: str = "") -> str:
    """The fingerprint to pin for the deposit key ``offered`` by the escrow at ``url``, or
    DepositKeyMismatch. ``configured`` (escrow_deposit_key_sha256) wins over ``pinned`` (what
    state.json recorded at enrollment); with neither, the offered key is trusted on first
    use."""
    seen = fingerprint(offered)
    expected, source = (configured, FROM_CONFIG) if configured else (pinned, FROM_ENROLLMENT)
    if expected and not hmac.compare_digest(seen, expected.lower()):
        raise DepositKeyMismatch(url, seen, expected.lower(), source)
    return seen


def check(url: str, offered: bytes, pinned: str) -> None:
    """Refuse (DepositKeyMismatch) a deposit key other than the pinned one; an empty pin is
    refused too, so that no deposit goes out unchecked."""
    if not pinned:
        raise AgentError(f"no deposit key of the escrow at {url} is pinned: nothing was sent",
                         "run `unseal-agent enroll` on this manager")
    pin_for(url, offered, pinned=pinned)
