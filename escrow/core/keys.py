"""Public keys sent or stored as PEM: custodian keys and agent keys are ECDSA P-256, the curve
smart cards, PKCS#11 tokens and swarm node keys all offer."""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from escrow.core.errors import InputError


def load_p256_public(pem: bytes, what: str, hint: str = "") -> ec.EllipticCurvePublicKey:
    """The P-256 public key in ``pem``; InputError naming ``what`` ("custodian public key")
    with ``hint`` otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise InputError(f"the {what} is not a PEM public key", hint) from None
    except UnsupportedAlgorithm:
        raise InputError(f"the {what} is of a type or curve this escrow does not support",
                         hint) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InputError(f"the {what} is not an ECDSA P-256 key", hint)
    return key
