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

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from escrow.hsm import HsmSettings, Pin, Token


class TokenKey(ec.EllipticCurvePrivateKey):
    @classmethod
    def open(cls, settings: HsmSettings, pin: Pin, label: str, *, create: bool) -> TokenKey:
        """Log in to the token and find (or create) the key pair labelled `label`."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-token")

        def find() -> tuple[Token, Any, bytes]:
            token = Token(settings, pin)
            try:
                return token, *token.signing_key(label, create=create)
            except BaseException:
                token.close()
                raise

        try:
            token, private, public = pool.submit(find).result()
        except BaseException:
            pool.shutdown()
            raise
        return cls(pool, token, private, public)

    def __init__(self, pool: ThreadPoolExecutor, token: Token, private: Any,
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
        return self._pool.submit(Token.sign_digest, self._private, digest).result()

    def _stays_in_the_token(self, *args: object) -> NoReturn:
        raise TypeError("the agent key lives in a PKCS#11 token and cannot leave it")

    exchange = _stays_in_the_token  # type: ignore[assignment]
    private_numbers = _stays_in_the_token
    private_bytes = _stays_in_the_token  # type: ignore[assignment]
    __copy__ = _stays_in_the_token
    __deepcopy__ = _stays_in_the_token  # type: ignore[assignment]

    def close(self) -> None:
        self._pool.submit(self._token.close).result()
        self._pool.shutdown()
