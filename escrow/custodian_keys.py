"""Custodian signing keys: ECDSA P-256, the curve smart cards and PKCS#11 tokens offer.

The private key stays with the custodian, encrypted under their passphrase; the escrow only
ever sees the public key. It is written in OpenSSH's private key format, whose passphrase goes
through bcrypt-pbkdf (a KDF made to be slow on GPUs), with AES-256-CTR: the strongest
passphrase protection `cryptography`'s encryption builder offers for a key file (it builds PKCS#8
only with PBKDF2 at 2,048 iterations). ``ssh-keygen -p -f FILE`` changes the passphrase.
Keys made before in encrypted PKCS#8 are still read.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from escrow.core.errors import InputError
from escrow.core.keys import load_p256_public

MIN_PASSPHRASE = 12
# bcrypt-pbkdf rounds: twice ssh-keygen's default of 16; about 0.2 s of one core each time a
# key is opened here, so a guess at the passphrase costs an attacker as much.
KDF_ROUNDS = 32
# A file asking for more would take minutes to open: damaged, or not made to be used.
MAX_KDF_ROUNDS = 1000
OPENSSH_PEM = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"


def generate(passphrase: bytes, *, kdf_rounds: int = KDF_ROUNDS) -> tuple[bytes, bytes]:
    """Return (encrypted private key, public key PEM). ``kdf_rounds`` is lowered only for
    throwaway keys (the test laboratory's, the demo's): `escrow custodian keygen` never does."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise InputError(f"the passphrase is shorter than {MIN_PASSPHRASE} characters",
                         "choose a longer passphrase; it protects your share of every key")
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = (serialization.PrivateFormat.OpenSSH.encryption_builder()
                  .kdf_rounds(kdf_rounds).build(passphrase))
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return private_pem, public_pem


def load_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    return load_p256_public(pem, "custodian public key", "custodian keys are P-256: give the "
                            "FILE.pub written by `escrow custodian keygen`")


def load_private(pem: bytes, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    rounds = openssh_kdf(pem)[2] if pem.lstrip().startswith(OPENSSH_PEM) else 0
    if rounds > MAX_KDF_ROUNDS:
        raise InputError(f"the private key asks for {rounds} bcrypt rounds, more than the "
                         f"{MAX_KDF_ROUNDS} this command spends on opening a key",
                         f"re-encrypt it with `ssh-keygen -p -a {KDF_ROUNDS} -f FILE`")
    try:
        key: object = (serialization.load_ssh_private_key(pem, password=passphrase)
                       if pem.lstrip().startswith(OPENSSH_PEM)
                       else serialization.load_pem_private_key(pem, password=passphrase))
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


def openssh_kdf(pem: bytes) -> tuple[bytes, bytes, int]:
    """The cipher, KDF and KDF rounds an OpenSSH private key file names (OpenSSH's
    PROTOCOL.key), read before its passphrase is tried; (b"", b"", 0) if the file is too damaged
    to say, so that opening it reports why."""
    try:
        blob = base64.b64decode(b"".join(pem.strip().splitlines()[1:-1]), validate=False)
    except (binascii.Error, ValueError):
        return b"", b"", 0
    if not blob.startswith(_OPENSSH_MAGIC):
        return b"", b"", 0
    fields, at = [], len(_OPENSSH_MAGIC)
    for _ in range(3):
        size = int.from_bytes(blob[at:at + 4], "big")
        fields.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    cipher, kdf, options = fields
    salt_size = int.from_bytes(options[:4], "big")
    if kdf != b"bcrypt" or len(options) < 8 + salt_size:
        return cipher, kdf, 0
    return cipher, kdf, int.from_bytes(options[4 + salt_size:8 + salt_size], "big")
