"""The exception hierarchy of the whole project: the escrow, its CLI and the node agent.

Every error carries a message (what happened, in the operator's words) and a hint (what to do
next). The CLIs print both and exit 1; the server maps families to HTTP statuses, and a
:class:`Refusal` says its own. No message may contain key material: messages are built from
names, ids and counts only.
"""

from __future__ import annotations


class EscrowError(Exception):
    """Base of every error the escrow or the agent reports to an operator."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class ConfigError(EscrowError):
    """The data directory, its config file or a command-line setting is unusable."""


class InputError(EscrowError):
    """Something the operator supplied (a key, a file, a name) is malformed."""


class HsmError(EscrowError):
    """The PKCS#11 token could not do what was asked."""


class HsmModuleMissing(HsmError):
    pass


class TokenNotFound(HsmError):
    pass


class SessionRefused(HsmError):
    """The token is there but would not open a logged-in session, for a reason other than the
    PIN: a TPM that is not the one the token was made in, or a broken token."""


class TokenUnavailable(HsmError):
    """The token stopped answering while in use: removed, its storage gone, or broken."""


class WrongPin(HsmError):
    pass


class WrappingKeyMissing(HsmError):
    pass


class ShareAuthFailed(HsmError):
    """A wrapped share failed AES-GCM authentication: altered, or moved to another row."""


class PolicyError(EscrowError):
    """A cluster's threshold and slots cannot work as given."""


class StoreError(EscrowError):
    """The database is missing, from a newer version, or refused a change."""


class NotFound(StoreError):
    pass


class Refusal(EscrowError):
    """A request refused for a reason the caller can act on: ``reason`` is a stable machine
    code, ``status`` the HTTP status it is answered with, ``retry_after`` (seconds) becomes a
    Retry-After header."""

    default_status = 400

    def __init__(self, reason: str, message: str, hint: str = "", status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, hint)
        self.reason = reason
        self.status = self.default_status if status is None else status
        self.retry_after = retry_after


class DiskFull(StoreError, Refusal):
    """The data directory's file system is (nearly) full: new keys are refused, releases go on
    in the reserve kept for them."""

    def __init__(self, message: str, hint: str = "") -> None:
        Refusal.__init__(self, "disk_full", message, hint, 507)


class Conflict(StoreError):
    pass


class WindowTaken(Conflict):
    """A maintenance window had no restart left (used up, closed or expired by another
    replica's request) when a request claiming it was written: nothing of it was."""


class AuditChainBroken(EscrowError):
    pass


class RecoveryError(EscrowError):
    """Paper shares could not be combined into an unlock key."""


class DrillMismatch(EscrowError):
    """A paper share does not match the escrow's copy of the share it should be."""


class IdentityError(Refusal):
    """A node or custodian failed an identity check (403 unless said otherwise)."""

    default_status = 403


class RequestError(Refusal):
    """An API request is malformed, too large, too frequent or about an unknown thing."""


def reason_of(error: EscrowError) -> str:
    """The machine code an error is counted and audited under."""
    return error.reason if isinstance(error, Refusal) else type(error).__name__
