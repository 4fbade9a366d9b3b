"""A request's encoded fields, decoded or refused with the field's name (400)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from escrow.core import protocol
from escrow.core.errors import InputError, RequestError
from escrow.core.keys import load_p256_public


def b64(value: str, what: str, size: int | None = None) -> bytes:
    try:
        raw = protocol.b64d(value)
    except ValueError:
        raise RequestError("bad_encoding", f"{what} is not base64") from None
    if size is not None and len(raw) != size:
        raise RequestError("bad_encoding", f"{what} must be {size} bytes, not {len(raw)}")
    return raw


def p256_public(pem: str, what: str) -> ec.EllipticCurvePublicKey:
    try:
        return load_p256_public(pem.encode("ascii"), what)
    except UnicodeEncodeError:
        raise RequestError("bad_key", f"the {what} is not a PEM public key") from None
    except InputError as exc:
        raise RequestError("bad_key", exc.message) from None


# Clamped X25519 scalars are multiples of the cofactor, so any one of them maps every low-order
# point, and only those, to zero: one key made at start tells them all apart.
_PROBE = X25519PrivateKey.generate()


def ephemeral(value: str) -> bytes:
    """A requester's X25519 key, refused if shares could not be encrypted to it (a low-order
    point makes every HPKE encryption fail)."""
    raw = b64(value, "ephemeral_public_key", 32)
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise RequestError("bad_key", "ephemeral_public_key is not a usable X25519 public key",
                           "send the public half of a freshly generated X25519 key") from None
    return raw
