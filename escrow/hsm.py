"""The PKCS#11 token: the only module that talks to ``python-pkcs11``.

The wrapping key is AES-256, created inside the token, sensitive and never extractable. A share
is sealed with AES-GCM made by the token, with associated data binding it to its row (see
:func:`escrow.encoding.share_aad`). Sealed bytes are ``0x01 || 12-byte IV || ciphertext+tag``.

SoftHSM is initialised by python-pkcs11 without locking callbacks, so one :class:`Token` must be
used from one thread at a time; the server gives it a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from escrow.errors import (
    ConfigError,
    HsmError,
    HsmModuleMissing,
    ShareAuthFailed,
    TokenNotFound,
    TokenUnavailable,
    WrappingKeyMissing,
    WrongPin,
)

SEALED_FORMAT = 0x01
IV_BYTES = 12
TAG_BITS = 128
PIN_CREDENTIAL = "hsm-pin"
PIN_ENV = "ESCROW_HSM_PIN"



@dataclass(frozen=True)
class HsmSettings:
    module: str
    token: str
    key_label: str = "escrow-wrap"
    pin_file: Path | None = None
    softhsm_conf: Path | None = None


@dataclass(frozen=True)
class Pin:
    value: str
    source: str  # where it came from, for error messages; never the PIN itself

    def __repr__(self) -> str:
        return f"Pin(<redacted>, source={self.source!r})"


def read_pin_file(path: Path, source: str, setting: str = "--hsm-pin-file") -> Pin:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"the HSM PIN file {path} does not exist",
                          f"create it (mode 0600) or point {setting} at the right file"
                          ) from None
    except PermissionError:
        raise ConfigError(f"the HSM PIN file {path} is not readable by this user",
                          "run as the escrow's user, or fix the file's owner") from None
    except UnicodeDecodeError:  # its message would quote a byte of the PIN
        raise ConfigError(f"the HSM PIN file {path} is not UTF-8 text",
                          "write the PIN as text, followed by a newline") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the HSM PIN file {path}: {exc.strerror}",
                          f"point {setting} at a regular file") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"the HSM PIN file {path} is readable or writable by every user",
                          f"run `chmod 600 {path}`")
    pin = text.rstrip("\r\n")
    if not pin:
        raise ConfigError(f"the HSM PIN file {path} is empty", "write the token's user PIN in it")
    return Pin(pin, source)


def resolve_pin(
    explicit_file: Path | None, configured_file: Path | None, env: Mapping[str, str]
) -> Pin:
    """Find the PIN: an explicit file, then a systemd credential, then the environment, then
    the file named in the config. Never from a command line."""
    if explicit_file is not None:
        return read_pin_file(explicit_file, f"file {explicit_file}")
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / PIN_CREDENTIAL).exists():
        path = Path(creds) / PIN_CREDENTIAL
        return read_pin_file(path, f"systemd credential {PIN_CREDENTIAL}")
    if env.get(PIN_ENV):
        # Kept for tests and one-off commands: the environment of a process is readable in
        # /proc/PID/environ by root and the same user, and is inherited by every child.
        logging.getLogger("escrow.hsm").warning(
            "the HSM PIN comes from %s, which any process of this user can read in "
            "/proc/PID/environ; use a PIN file or the systemd credential %s instead",
            PIN_ENV, PIN_CREDENTIAL)
        return Pin(env[PIN_ENV], f"environment variable {PIN_ENV}")
    if configured_file is not None:
        return read_pin_file(configured_file, f"file {configured_file}")
    raise ConfigError(
        "no HSM PIN was found",
        f"give --hsm-pin-file, set {PIN_ENV}, pass a systemd credential named "
        f"{PIN_CREDENTIAL} (LoadCredential=), or set [hsm] pin_file in escrow.toml",
    )


def load_module(settings: HsmSettings) -> Any:
    if settings.softhsm_conf is not None:
        # SoftHSM reads its config once, when the module is initialised.
        os.environ["SOFTHSM2_CONF"] = str(settings.softhsm_conf)
    try:
        return pkcs11.lib(settings.module)
    except pkcs11.PKCS11Error:
        raise HsmModuleMissing(
            f"the PKCS#11 module {settings.module} could not be loaded",
            "install it (SoftHSM2: `apt-get install softhsm2`) or set [hsm] module / "
            "--hsm-module to your HSM vendor's library",
        ) from None


class Token:
    """One logged-in session on the escrow's token."""

    def __init__(self, settings: HsmSettings, pin: Pin, *, reinitialize: bool = False) -> None:
        """Log in. ``reinitialize`` restarts the module first, which a token that went away
        and came back needs before it is seen again (every other session of this process is
        closed by it)."""
        self.settings = settings
        lib = load_module(settings)
        try:
            if reinitialize:
                lib.reinitialize()
            token = lib.get_token(token_label=settings.token)
        except pkcs11.NoSuchToken:
            raise TokenNotFound(
                f"no token labelled {settings.token!r} in {settings.module}",
                "check [hsm] token in escrow.toml; list tokens with `softhsm2-util --show-slots` "
                "or your HSM vendor's tool",
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise TokenNotFound(
                f"more than one token is labelled {settings.token!r}",
                "give each token a unique label",
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise _unavailable(settings.token, exc) from None
        try:
            self._session = token.open(user_pin=pin.value, rw=True)
        except pkcs11.PinIncorrect:
            raise WrongPin(f"the token {settings.token!r} refused the PIN from {pin.source}",
                           "check the PIN; repeated failures lock the token") from None
        except pkcs11.PinLocked:
            raise WrongPin(f"the token {settings.token!r} is locked after too many wrong PINs",
                           "the token's security officer must reset the user PIN") from None
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"could not open a session on token {settings.token!r}: "
                           f"{type(exc).__name__}", "check the token and its module") from None
        self._keys: dict[str, WrappingKey] = {}

    def close(self) -> None:
        # A session on a token that went away cannot be closed, only forgotten.
        with contextlib.suppress(pkcs11.PKCS11Error):
            self._session.close()

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _find_key(self, label: str) -> Any:
        try:
            return self._session.get_key(label=label, key_type=KeyType.AES,
                                         object_class=ObjectClass.SECRET_KEY)
        except pkcs11.NoSuchKey:
            return None
        except pkcs11.MultipleObjectsReturned:
            raise WrappingKeyMissing(
                f"the token holds several keys labelled {label!r}",
                "remove the duplicates with your HSM's tool; keep the one the shares were made "
                "with",
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise _unavailable(self.settings.token, exc) from None

    def create_wrapping_key(self, label: str | None = None) -> bool:
        """Create a wrapping key (the configured label by default) unless it exists. Returns
        True when it was created."""
        label = label or self.settings.key_label
        if self._find_key(label) is not None:
            return False
        self._session.generate_key(
            KeyType.AES, 256, label=label, store=True,
            template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.MODIFIABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
            },
        )
        return True

    def wrapping_key(self, label: str | None = None) -> WrappingKey:
        """The wrapping key with this label (the configured one by default)."""
        label = label or self.settings.key_label
        if label not in self._keys:
            key = self._find_key(label)
            if key is None:
                raise WrappingKeyMissing(
                    f"the token {self.settings.token!r} has no wrapping key labelled "
                    f"{label!r}",
                    "if this is a new token run `escrow init`; if the key was lost, shares "
                    "wrapped with it are lost too: see docs/runbooks for recovery from paper",
                )
            if not key[Attribute.SENSITIVE] or key[Attribute.EXTRACTABLE]:
                raise WrappingKeyMissing(
                    f"the key {label!r} is extractable or not sensitive",
                    "the escrow only uses a wrapping key that can never leave the token",
                )
            self._keys[label] = WrappingKey(self, label, key)
        return self._keys[label]

    def destroy_wrapping_key(self, label: str) -> None:
        """Destroy a wrapping key for ever. Callers check first that nothing needs it."""
        key = self._find_key(label)
        if key is None:
            raise WrappingKeyMissing(f"the token {self.settings.token!r} has no wrapping key "
                                     f"labelled {label!r}", "check the label")
        try:
            key.destroy()
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"the token refused to destroy the key {label!r}: "
                           f"{type(exc).__name__}", "check the token's policy for key "
                           "destruction, or destroy it with your HSM vendor's tool") from None
        self._keys.pop(label, None)

    def signing_key(self, label: str, *, create: bool) -> tuple[Any, bytes]:
        """A P-256 key pair inside the token, its private half sensitive and never
        extractable: (private key object, public key as DER SubjectPublicKeyInfo)."""
        try:
            private = self._session.get_key(label=label, key_type=KeyType.EC,
                                            object_class=ObjectClass.PRIVATE_KEY)
            public = self._session.get_key(label=label, key_type=KeyType.EC,
                                           object_class=ObjectClass.PUBLIC_KEY)
        except pkcs11.NoSuchKey:
            if not create:
                raise HsmError(f"the token {self.settings.token!r} holds no key pair labelled "
                               f"{label!r}", "run `unseal-agent enroll` to create it") from None
            parameters = self._session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True)
            public, private = parameters.generate_keypair(
                store=True, label=label,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.SIGN: True, Attribute.PRIVATE: True})
        return private, bytes(encode_ec_public_key(public))

    @staticmethod
    def sign_digest(private: Any, digest: bytes) -> bytes:
        """ECDSA over a SHA-256 digest (tokens such as SoftHSM lack CKM_ECDSA_SHA256), as DER."""
        try:
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"the token failed to sign: {type(exc).__name__}",
                           "check the token's health") from None
        return bytes(encode_ecdsa_signature(raw))

    def check(self) -> None:
        """Raise unless the configured wrapping key is present and usable."""
        self.wrapping_key()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self.wrapping_key().seal(plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        return self.wrapping_key().open(sealed, aad)

    def random(self, count: int) -> bytes:
        try:
            return bytes(self._session.generate_random(count * 8))
        except pkcs11.PKCS11Error as exc:
            raise _unavailable(self.settings.token, exc) from None


class WrappingKey:
    """One AES wrapping key inside the token: seals and opens shares."""

    def __init__(self, token: Token, label: str, key: Any) -> None:
        self.token = token
        self.label = label
        self._key = key

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        iv = self.token.random(IV_BYTES)
        params = GCMParams(iv, aad, TAG_BITS)
        try:
            ct = self._key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                   mechanism_param=params)
        except pkcs11.PKCS11Error as exc:
            raise _unavailable(self.token.settings.token, exc) from None
        return bytes([SEALED_FORMAT]) + iv + bytes(ct)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 1 + IV_BYTES + TAG_BITS // 8 or sealed[0] != SEALED_FORMAT:
            raise ShareAuthFailed("a wrapped share is truncated or of an unknown format",
                                  "the database row was altered; restore it from a backup")
        params = GCMParams(sealed[1:1 + IV_BYTES], aad, TAG_BITS)
        body = sealed[1 + IV_BYTES:]
        try:
            return bytes(self._key.decrypt(body, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=params))
        except _BAD_CIPHERTEXT:
            # SoftHSM reports a bad GCM tag as a bare GeneralError; other tokens use
            # EncryptedDataInvalid. Either way the row is not what was sealed for this place.
            raise ShareAuthFailed(
                "a wrapped share failed authentication: it was altered, copied from another "
                f"row, or sealed with a wrapping key other than {self.label!r}",
                "restore the database from a backup, or rotate the unlock key to make fresh "
                "shares",
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise _unavailable(self.token.settings.token, exc) from None


# What a token says of a ciphertext that fails authentication; any other error means the
# token itself (its session, its objects, the device) is gone or broken.
_BAD_CIPHERTEXT = (pkcs11.GeneralError, pkcs11.EncryptedDataInvalid,
                   pkcs11.EncryptedDataLenRange)


def _unavailable(token: str, exc: pkcs11.PKCS11Error) -> TokenUnavailable:
    return TokenUnavailable(
        f"the token {token!r} stopped answering ({type(exc).__name__}): it was removed, "
        "its storage went away, the device failed, or the escrow ran out of open files",
        "bring the token back (SoftHSM: its token directory); the escrow reopens it by itself",
    )
