"""Who may see the fleet's status (the page, `escrow status`), and what they see.

A viewer holds a random token; the store keeps its SHA-256 alone (a token has 256 bits, so
no slow hash is needed against guessing), so a copy of the database lets no one view. Viewing
reads the store and nothing else: it works while the HSM is down, which is when on-call looks.
A viewer sees states, names and times, never key material, shares or signatures
(escrow.core.fleet).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime

from escrow.core.errors import IdentityError
from escrow.core.fleet import FleetCluster
from escrow.service import fleet
from escrow.store import Store

TOKEN_PREFIX = "esv_"  # noqa: S105 - a label: a leaked token is recognisable by it
_TOKEN_BYTES = 32
MAX_TOKEN = 100


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _unknown() -> IdentityError:
    return IdentityError("unknown_viewer", "no viewer holds this token",
                         "ask the escrow's admin for one (`escrow viewer add NAME "
                         "--token-file FILE`)", 401)


class Viewing:
    def __init__(self, store: Store, max_versions: int, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.max_versions = max_versions
        self.clock = clock

    def identify(self, token: str) -> str:
        """The viewer holding ``token``; IdentityError (401) for any other string."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN:
            raise _unknown()
        name = self.store.viewer_named_by(token_sha256(token))
        if name is None:
            raise _unknown()
        return name

    def clusters(self) -> list[FleetCluster]:
        return fleet.clusters(fleet.read(self.store, self.max_versions), self.clock(),
                              self.max_versions)
