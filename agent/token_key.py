"""An agent key that never leaves a PKCS#11 token (a TPM through tpm2-pkcs11, a smart card;
SoftHSM in tests), usable wherever the agent signs with a `cryptography` EC key.

Every call into the token runs on one thread of its own: the token needs one thread at a time,
and SoftHSM's OpenSSL leaves errors (`ENGINE: NO_SUCH_ENGINE`) in the calling thread's OpenSSL
error queue, which Python's ssl module then reports as the failure of the next TLS handshake
made on that thread. Kept apart, the agent's TLS never sees them.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from escrow.core.errors import HsmError
from escrow.core.hsm import HsmSettings, Pin
from escrow.core.pkcs11 import Session


class TokenKey(ec.EllipticCurvePrivateKey):
    @classmethod
    def open(cls, settings: HsmSettings, pin: Pin, label: str, *, create: bool) -> TokenKey:
        """Log in to the token and find (or create) the key pair labelled `label`."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-token")

        def find() -> tuple[Session, Any, bytes]:
            token = Session(settings, pin)
            try:
                return token, *_signing_key(token, label, create=create)
            except BaseException:
                token.close()
                raise

        try:
            token, private, public = pool.submit(find).result()
        except BaseException:
            pool.shutdown()
            raise
        return cls(pool, token, private, public)

    def __init__(self, pool: ThreadPoolExecutor, token: Session, private: Any,
                 public_der: bytes) -> None:
        self._pool = pool
        self._token = token
        self._private = private
        public = serialization.load_der_public_key(public_der)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise TypeError("the token's agent key is not an EC key")
        self._public = public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes | Any,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not (isinstance(signature_algorithm, ec.ECDSA)
                and isinstance(signature_algorithm.algorithm, hashes.SHA256)):
            raise TypeError("the token key signs ECDSA with SHA-256 only")
        digest = hashlib.sha256(bytes(data)).digest()
        return self._pool.submit(_sign_digest, self._private, digest).result()

    # What would take the private key out of the token, or use it for more than signing.
    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _stays_in_the_token()

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _stays_in_the_token()

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        _stays_in_the_token()

    def __copy__(self) -> ec.EllipticCurvePrivateKey:
        _stays_in_the_token()

    def __deepcopy__(self, memo: dict[int, object]) -> ec.EllipticCurvePrivateKey:
        _stays_in_the_token()

    def close(self) -> None:
        self._pool.submit(self._token.close).result()
        self._pool.shutdown()


def _stays_in_the_token() -> NoReturn:
    raise TypeError("the agent key lives in a PKCS#11 token and cannot leave it")


def _signing_key(token: Session, label: str, *, create: bool) -> tuple[Any, bytes]:
    """A P-256 key pair inside the token, its private half sensitive and never extractable:
    (private key object, public key as DER SubjectPublicKeyInfo)."""
    session = token.pkcs11_session
    try:
        private = session.get_key(label=label, key_type=KeyType.EC,
                                  object_class=ObjectClass.PRIVATE_KEY)
        public = session.get_key(label=label, key_type=KeyType.EC,
                                 object_class=ObjectClass.PUBLIC_KEY)
    except pkcs11.NoSuchKey:
        if not create:
            raise HsmError(f"the token {token.settings.token!r} holds no key pair labelled "
                           f"{label!r}", "run `unseal-agent enroll` to create it") from None
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        public, private = parameters.generate_keypair(
            store=True, label=label,
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.SIGN: True, Attribute.PRIVATE: True})
    return private, bytes(encode_ec_public_key(public))


def _sign_digest(private: Any, digest: bytes) -> bytes:
    """ECDSA over a SHA-256 digest (tokens such as SoftHSM lack CKM_ECDSA_SHA256), as DER."""
    try:
        raw = private.sign(digest, mechanism=Mechanism.ECDSA)
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"the token failed to sign: {type(exc).__name__}",
                       "check the token's health") from None
    return bytes(encode_ecdsa_signature(raw))
