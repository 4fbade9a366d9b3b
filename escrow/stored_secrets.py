"""The escrow's own secrets kept in the store, wrapped by the token: the deposit key (agents
encrypt unlock keys to it) and the nonce key. `escrow hsm rewrap` moves them with the shares."""

from __future__ import annotations

from collections.abc import Callable

from escrow.audit import AuditEvent
from escrow.core.encoding import encode
from escrow.store import Store
from escrow.vault import Wrapper

DEPOSIT_KEY = "deposit-key"
NONCE_KEY = "nonce-key"
# Each secret's associated data binds its wrapped bytes to its name.
WRAPPED_META = {DEPOSIT_KEY: encode("swarm-unseal/v1/deposit-key"),
                NONCE_KEY: encode("swarm-unseal/v1/nonce-key")}


def wrapped_secret(store: Store, wrapper: Wrapper, name: str, make: Callable[[], bytes]) -> bytes:
    """The secret ``name``, unwrapped; made, wrapped and stored (audited) on first use."""
    aad = WRAPPED_META[name]
    wrapped = store.get_meta(name)
    if wrapped is None:
        raw = make()
        store.put_meta(name, wrapper.wrap(raw, aad),
                       AuditEvent(f"escrow.{name}", "escrow", "", {"action": "created"}))
        return raw
    return wrapper.unwrap(wrapped, aad)
