"""The escrow's own secrets kept in the store, wrapped by the token: the deposit key (agents
encrypt unlock keys to it) and the nonce key. `escrow hsm rewrap` moves them with the shares."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from escrow.audit import AuditEvent
from escrow.core.encoding import encode
from escrow.store import Store
from escrow.vault import Wrapper

DEPOSIT_KEY = "deposit-key"
NONCE_KEY = "nonce-key"
# Each secret's associated data binds its wrapped bytes to its name.
WRAPPED_META = {DEPOSIT_KEY: encode("swarm-unseal/v1/deposit-key"),
                NONCE_KEY: encode("swarm-unseal/v1/nonce-key")}


_MAKE: dict[str, Callable[[], bytes]] = {
    DEPOSIT_KEY: lambda: X25519PrivateKey.generate().private_bytes_raw(),
    NONCE_KEY: lambda: secrets.token_bytes(32),
}


def wrapped_secret(store: Store, wrapper: Wrapper, name: str) -> bytes:
    """The secret ``name``, unwrapped; made, wrapped and stored (audited) on first use, by
    whichever replica comes first."""
    aad = WRAPPED_META[name]
    wrapped = store.get_meta(name)
    if wrapped is None:
        wrapped = store.add_meta(name, wrapper.wrap(_MAKE[name](), aad),
                                 AuditEvent(f"escrow.{name}", "escrow", "", {"action": "created"}))
    return wrapper.unwrap(wrapped, aad)
