"""The agent's exception hierarchy; messages are for the operator reading the journal."""

from __future__ import annotations


class AgentError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        return f"error: {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")


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
