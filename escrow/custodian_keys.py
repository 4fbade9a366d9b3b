"""Custodian signing keys: ECDSA P-256, the curve smart cards and PKCS#11 tokens offer.

The private key stays with the custodian, encrypted under their passphrase; the escrow only
ever sees the public key.
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from escrow.core.errors import InputError
from escrow.core.keys import load_p256_public

MIN_PASSPHRASE = 12


def generate(passphrase: bytes) -> tuple[bytes, bytes]:
    """Return (encrypted private key PEM, public key PEM)."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise InputError(f"the passphrase is shorter than {MIN_PASSPHRASE} characters",
                         "choose a longer passphrase; it protects your share of every key")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return private_pem, public_pem


def load_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    return load_p256_public(pem, "custodian public key", "custodian keys are P-256: give the "
                            "FILE.pub written by `escrow custodian keygen`")


def load_private(pem: bytes, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError):
        raise InputError("the private key could not be opened: wrong passphrase or not a key",
                         "check the passphrase (file) and the --key path") from None
    except UnsupportedAlgorithm:
        raise InputError("the private key is of a type or curve this escrow does not support, "
                         "or encrypted with an unsupported cipher",
                         "custodian keys are P-256; make one with `escrow custodian keygen`"
                         ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InputError("the private key is not an ECDSA P-256 key",
                         "custodian keys are P-256; make one with `escrow custodian keygen`")
    return key
