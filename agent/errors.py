"""The agent's errors, in the project's one hierarchy (escrow.core.errors); messages are for
the operator reading the journal."""

from __future__ import annotations

from escrow.core.errors import EscrowError


class AgentError(EscrowError):
    """Something this agent could not do."""


class EscrowUnavailable(AgentError):
    """The escrow could not be reached or answered 5xx: retry with back-off."""


class EscrowRejected(AgentError):
    """The escrow refused the request (4xx): retrying the same thing will not help."""

    def __init__(self, status: int, reason: str, message: str, hint: str = "") -> None:
        super().__init__(f"the escrow refused ({status} {reason}): {message}", hint)
        self.status = status
        self.reason = reason


class SharesUnusable(AgentError):
    """Released shares did not decrypt or combine."""


class DepositKeyMismatch(AgentError):
    """The escrow offers a deposit key other than the one this agent pinned: it may be an
    impersonator (say, someone holding the escrow's TLS key). Nothing is sent to it."""

    def __init__(self, url: str, offered: str, pinned: str, source: str) -> None:
        super().__init__(
            f"the escrow at {url} offers deposit key sha256 {offered}, this agent pinned "
            f"{pinned} {source}: the unlock key was not sent",
            "an escrow keeps its deposit key through `escrow restore` and `escrow hsm "
            "rewrap`, so treat this as an impersonation of the escrow unless it was rebuilt "
            "from scratch (a new `escrow init`). Only then: read the fingerprint on the escrow "
            "host (README, \"The node agent\") and, if it is the one above, run `unseal-agent "
            "enroll --escrow-deposit-key-sha256 FINGERPRINT` (or set escrow_deposit_key_sha256 "
            "in config.toml)")
        self.offered = offered
        self.pinned = pinned
