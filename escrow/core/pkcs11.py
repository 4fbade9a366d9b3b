"""A logged-in session on a PKCS#11 token: the only place that opens one. The escrow's wrapping
keys (:mod:`escrow.wrapping`) and the agent's token-held key (:mod:`agent.token_key`) build on
it.

SoftHSM is initialised by python-pkcs11 without locking callbacks, so one session must be used
from one thread at a time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Self

import pkcs11

from escrow.core.errors import (
    HsmModuleMissing,
    SessionRefused,
    TokenNotFound,
    TokenUnavailable,
    WrongPin,
)
from escrow.core.hsm import HsmSettings, Pin


def load_module(settings: HsmSettings) -> Any:
    if settings.softhsm_conf is not None:
        # SoftHSM reads its config once, when the module is initialised.
        os.environ["SOFTHSM2_CONF"] = str(settings.softhsm_conf)
    try:
        return pkcs11.lib(settings.module)
    except pkcs11.PKCS11Error as exc:
        if not os.path.exists(settings.module):
            raise HsmModuleMissing(
                f"the PKCS#11 module {settings.module} could not be loaded",
                "install it (SoftHSM2: `apt-get install softhsm2`) or set "
                f"{settings.module_set_in} to your HSM vendor's library",
            ) from None
        # Loaded, but C_Initialize failed: tpm2-pkcs11 does so when no TPM answers.
        raise HsmModuleMissing(
            f"the PKCS#11 module {settings.module} could not be loaded: it is installed but "
            f"would not start ({type(exc).__name__})",
            "SoftHSM needs its config (SOFTHSM2_CONF) and token directory; a TPM's module "
            "(tpm2-pkcs11) needs a TPM it can reach: /dev/tpmrm0 present and, under systemd, "
            "allowed by DeviceAllow=/dev/tpmrm0 rw, and its store directory "
            "(TPM2_PKCS11_STORE) writable; TPM2_PKCS11_LOG_LEVEL=2 makes tpm2-pkcs11 say why; "
            "another HSM's module needs its vendor's configuration",
        ) from None


class Session:
    """One logged-in session on a token."""

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
                f"check {settings.label_set_in}; list tokens with `softhsm2-util --show-slots` "
                "or your HSM vendor's tool",
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise TokenNotFound(
                f"more than one token is labelled {settings.token!r}",
                "give each token a unique label",
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise unavailable(settings.token, exc) from None
        try:
            self.pkcs11_session = token.open(user_pin=pin.value, rw=True)
        except pkcs11.PinIncorrect:
            raise WrongPin(f"the token {settings.token!r} refused the PIN from {pin.source}",
                           "check the PIN; repeated failures lock the token") from None
        except pkcs11.PinLocked:
            raise WrongPin(f"the token {settings.token!r} is locked after too many wrong PINs",
                           "the token's security officer must reset the user PIN") from None
        except pkcs11.PKCS11Error as exc:
            raise SessionRefused(f"could not open a session on token {settings.token!r}: "
                                 f"{type(exc).__name__}", "check the token and its module",
                                 ) from None

    def close(self) -> None:
        # A session on a token that went away cannot be closed, only forgotten.
        with contextlib.suppress(pkcs11.PKCS11Error):
            self.pkcs11_session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def random(self, count: int) -> bytes:
        try:
            return bytes(self.pkcs11_session.generate_random(count * 8))
        except pkcs11.PKCS11Error as exc:
            raise unavailable(self.settings.token, exc) from None


def unavailable(token: str, exc: pkcs11.PKCS11Error) -> TokenUnavailable:
    return TokenUnavailable(
        f"the token {token!r} stopped answering ({type(exc).__name__}): it was removed, "
        "its storage went away, the device failed, or the escrow ran out of open files",
        "bring the token back (SoftHSM: its token directory); the escrow reopens it by itself",
    )
