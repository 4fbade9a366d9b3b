"""The headers that let a receiver check that a body comes from this escrow, unchanged and
recently (pure). README, "Notifications", shows the receiver's side.

The signature is an HMAC-SHA256, under the receiver's own secret, of the attempt's Unix time,
a dot and the body's bytes as sent: a receiver that checks it and the time's freshness takes
no forged event from someone who knows its URL, and no event replayed long after it was sent.
Each attempt is signed anew at its own time; the event's id stays the same.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Escrow-Webhook-Signature"
ID_HEADER = "X-Escrow-Webhook-Id"
EVENT_HEADER = "X-Escrow-Webhook-Event"
VERSION = "v1"


def signature(secret: bytes, body: bytes, at: int) -> str:
    """``t=<at>,v1=<hex HMAC-SHA256(secret, "<at>." + body)>``."""
    mac = hmac.new(secret, f"{at}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return f"t={at},{VERSION}={mac}"


def headers(secret: bytes, body: bytes, at: int, event_id: str, kind: str) -> dict[str, str]:
    return {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, body, at),
            ID_HEADER: event_id, EVENT_HEADER: str(kind)}
