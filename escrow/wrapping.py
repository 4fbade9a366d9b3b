"""The escrow's wrapping keys inside its PKCS#11 token: where a share is wrapped and unwrapped.

The wrapping key is AES-256, created inside the token, sensitive and never extractable. A share
is wrapped with AES-GCM made by the token, with associated data binding it to its row (see
:func:`escrow.core.encoding.share_aad`). Wrapped bytes are ``0x01 || 12-byte IV ||
ciphertext+tag``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from escrow.core.errors import ConfigError, HsmError, ShareAuthFailed, WrappingKeyMissing
from escrow.core.hsm import HsmSettings, Pin, credential_pin, read_pin_file
from escrow.core.pkcs11 import Session, unavailable

WRAPPED_FORMAT = 0x01
IV_BYTES = 12
TAG_BITS = 128
PIN_CREDENTIAL = "hsm-pin"
PIN_ENV = "ESCROW_HSM_PIN"


def resolve_pin(
    explicit_file: Path | None, configured_file: Path | None, env: Mapping[str, str]
) -> Pin:
    """Find the PIN: an explicit file, then a systemd credential, then the environment, then
    the file named in the config. Never from a command line."""
    if explicit_file is not None:
        return read_pin_file(explicit_file, f"file {explicit_file}")
    credential = credential_pin(env, PIN_CREDENTIAL, "LoadCredential=")
    if credential is not None:
        return credential
    if env.get(PIN_ENV):
        # Kept for tests and one-off commands: the environment of a process is readable in
        # /proc/PID/environ by root and the same user, and is inherited by every child.
        logging.getLogger("escrow.wrapping").warning(
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


class Token(Session):
    """A session on the escrow's token, with its wrapping keys."""

    def __init__(self, settings: HsmSettings, pin: Pin, *, reinitialize: bool = False) -> None:
        super().__init__(settings, pin, reinitialize=reinitialize)
        self._keys: dict[str, WrappingKey] = {}

    def _find_key(self, label: str) -> Any:
        try:
            return self.pkcs11_session.get_key(label=label, key_type=KeyType.AES,
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
            raise unavailable(self.settings.token, exc) from None

    def create_wrapping_key(self, label: str | None = None) -> bool:
        """Create a wrapping key (the configured label by default) unless it exists. Returns
        True when it was created."""
        label = label or self.settings.key_label
        if self._find_key(label) is not None:
            return False
        self.pkcs11_session.generate_key(
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

    def check(self) -> None:
        """Raise unless the configured wrapping key is present and usable."""
        self.wrapping_key()

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        return self.wrapping_key().wrap(plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return self.wrapping_key().unwrap(wrapped, aad)



class WrappingKey:
    """One AES wrapping key inside the token: wraps and unwraps shares."""

    def __init__(self, token: Token, label: str, key: Any) -> None:
        self.token = token
        self.label = label
        self._key = key

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        iv = self.token.random(IV_BYTES)
        params = GCMParams(iv, aad, TAG_BITS)
        try:
            ct = self._key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                   mechanism_param=params)
        except pkcs11.PKCS11Error as exc:
            raise unavailable(self.token.settings.token, exc) from None
        return bytes([WRAPPED_FORMAT]) + iv + bytes(ct)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < 1 + IV_BYTES + TAG_BITS // 8 or wrapped[0] != WRAPPED_FORMAT:
            raise ShareAuthFailed("a wrapped share is truncated or of an unknown format",
                                  "the database row was altered; restore it from a backup")
        params = GCMParams(wrapped[1:1 + IV_BYTES], aad, TAG_BITS)
        body = wrapped[1 + IV_BYTES:]
        try:
            return bytes(self._key.decrypt(body, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=params))
        except _BAD_CIPHERTEXT:
            # SoftHSM reports a bad GCM tag as a bare GeneralError; other tokens use
            # EncryptedDataInvalid. Either way the row is not what was wrapped for this place.
            raise ShareAuthFailed(
                "a wrapped share failed authentication: it was altered, copied from another "
                f"row, or wrapped with a wrapping key other than {self.label!r}",
                "restore the database from a backup, or rotate the unlock key to make fresh "
                "shares",
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise unavailable(self.token.settings.token, exc) from None


# What a token says of a ciphertext that fails authentication; any other error means the
# token itself (its session, its objects, the device) is gone or broken.
_BAD_CIPHERTEXT = (pkcs11.GeneralError, pkcs11.EncryptedDataInvalid,
                   pkcs11.EncryptedDataLenRange)


