"""An agent key that never leaves a PKCS#11 token (a TPM through tpm2-pkcs11, a smart card;
SoftHSM in tests), usable wherever the agent signs with a `cryptography` EC key.

Every call into the token runs on one thread of its own: the token needs one thread at a time,
and SoftHSM's OpenSSL leaves errors (`ENGINE: NO_SUCH_ENGINE`) in the calling thread's OpenSSL
error queue, which Python's ssl module then reports as the failure of the next TLS handshake
made on that thread. Kept apart, the agent's TLS never sees them.
"""

from __future__ import annotations

import ctypes
import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from escrow.core.errors import HsmError, SessionRefused, TokenNotFound
from escrow.core.hsm import HsmSettings, Pin
from escrow.core.pkcs11 import Session, load_module


class TokenKey(ec.EllipticCurvePrivateKey):
    @classmethod
    def open(cls, settings: HsmSettings, pin: Pin, label: str, *, create: bool) -> TokenKey:
        """Log in to the token and find (or create) the key pair labelled `label`."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-token")

        def find() -> tuple[Session, Any, bytes]:
            token = _session(settings, pin, create=create)
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


def _session(settings: HsmSettings, pin: Pin, *, create: bool) -> Session:
    """A session on the agent's token; with `create`, the token is first made in a free slot
    when none has its label (a TPM through tpm2-pkcs11 always offers one)."""
    try:
        return Session(settings, pin)
    except SessionRefused as refused:
        # tpm2-pkcs11 answers a plain CKR_GENERAL_ERROR when the TPM cannot load the token's
        # keys, which are wrapped under the TPM's own storage seed.
        raise SessionRefused(
            f"{refused.message}. With a TPM, this TPM cannot load the token's keys: the token's "
            "store was made by another TPM (this disk was copied from another machine) or "
            "the TPM was cleared since",
            "on the machine that enrolled, check the TPM; a new machine or a cleared TPM needs "
            "a new token (delete the old one: tpm2_ptool rmtoken --label LABEL) and "
            "`unseal-agent enroll`") from None
    except TokenNotFound as missing:
        if not create:
            raise TokenNotFound(missing.message,
                                "run `unseal-agent enroll`, which creates the token and its key; "
                                f"or check {settings.label_set_in}") from None
    _init_token(settings, pin)
    return Session(settings, pin)


def _init_token(settings: HsmSettings, pin: Pin) -> None:
    """Initialise the first free slot's token as `settings.token`, its user PIN `pin`. The
    security officer's PIN is random and forgotten: it could only reset the user PIN, and a
    node whose PIN is lost is simply enrolled again with a new token."""
    label = settings.token.encode("utf-8")
    if len(label) > 32:
        raise HsmError(f"the token label {settings.token!r} is longer than 32 bytes",
                       f"shorten {settings.label_set_in}")
    lib = load_module(settings)
    free = [slot for slot in lib.get_slots(token_present=True)
            if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED]
    if not free:
        raise HsmError(f"{settings.module} has no free slot to create the token "
                       f"{settings.token!r} in",
                       "free one with the token's own tool (tpm2_ptool rmtoken, softhsm2-util "
                       "--delete-token), or name an existing token")
    so_pin = secrets.token_urlsafe(24).encode("ascii")
    # python-pkcs11 binds no C_InitToken; every PKCS#11 module exports it by name, and this
    # process already initialised the module, which the call needs.
    init = ctypes.CDLL(settings.module).C_InitToken
    init.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    init.restype = ctypes.c_ulong
    result = init(free[0].slot_id, so_pin, len(so_pin), label.ljust(32))
    if result != 0:
        raise HsmError(f"{settings.module} refused to create the token {settings.token!r} "
                       f"(CKR 0x{result:x})", "check the module's own log and its store")
    try:
        token = lib.get_token(token_label=settings.token)
        with token.open(rw=True, so_pin=so_pin.decode("ascii")) as officer:
            officer.init_pin(pin.value)
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"setting the user PIN of the new token {settings.token!r} failed: "
                       f"{type(exc).__name__}", "delete the token and enroll again") from None


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
        # tpm2-pkcs11 derives the usage attributes from the TPM object it creates and refuses a
        # template that states them otherwise (1.9 even reports the public half's VERIFY and
        # ENCRYPT swapped), so only SIGN is asked for and python-pkcs11's defaults are dropped.
        public, private = parameters.generate_keypair(
            store=True, label=label, capabilities=0,
            public_template={Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT,
                             Attribute.VERIFY: DEFAULT},
            private_template={Attribute.DECRYPT: DEFAULT, Attribute.UNWRAP: DEFAULT,
                              Attribute.DERIVE: DEFAULT, Attribute.SIGN: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.PRIVATE: True})
    return private, bytes(encode_ec_public_key(public))


def _sign_digest(private: Any, digest: bytes) -> bytes:
    """ECDSA over a SHA-256 digest (tokens such as SoftHSM lack CKM_ECDSA_SHA256), as DER."""
    try:
        raw = private.sign(digest, mechanism=Mechanism.ECDSA)
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"the token failed to sign: {type(exc).__name__}",
                       "check the token's health") from None
    return bytes(encode_ecdsa_signature(raw))
