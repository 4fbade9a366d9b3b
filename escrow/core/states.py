"""The states a request, a node, a custodian's decision and an agent's report can be in.

Pure and stdlib only, so the agent can share them. Each value is the string stored in the
database and sent on the wire; a ``StrEnum`` member compares equal to it.
"""

from __future__ import annotations

from enum import StrEnum


class RequestState(StrEnum):
    """A request's state. The store keeps pending, denied, superseded, completed and revoked;
    ``expired`` is derived from the time and ``ready`` from the shares released."""

    PENDING = "pending"
    READY = "ready"
    DENIED = "denied"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    COMPLETED = "completed"
    REVOKED = "revoked"


class NodeStatus(StrEnum):
    """An enrolled node's standing: only an active node is given shares. A quarantined node
    looked cloned (two machines with its identity alive at once); an admin re-admits it, as a
    revoked one, with `escrow node allow`."""

    ACTIVE = "active"
    REVOKED = "revoked"
    QUARANTINED = "quarantined"


class LockState(StrEnum):
    """What an agent's heartbeat says of its manager."""

    UNLOCKED = "unlocked"
    LOCKED = "locked"


class Liveness(StrEnum):
    """What the escrow makes of a node's heartbeats: the last beat's lock state, or
    unreachable once no beat came for three of the node's intervals (or it said goodbye)."""

    UNLOCKED = "unlocked"
    LOCKED = "locked"
    UNREACHABLE = "unreachable"


class NodeState(StrEnum):
    """What the status page and `escrow status` say of an enrolled manager: its liveness, told
    apart when a locked one waits for custodians, or its standing when it is not active."""

    UNLOCKED = "unlocked"
    LOCKED = "locked"
    WAITING = "waiting"  # locked, with a request short of custodian approvals
    UNREACHABLE = "unreachable"
    QUARANTINED = "quarantined"
    REVOKED = "revoked"


class Decision(StrEnum):
    """A custodian's decision on a request."""

    APPROVE = "approve"
    DENY = "deny"


class Outcome(StrEnum):
    """What an agent reports after trying one key version."""

    UNLOCKED = "unlocked"
    INVALID_KEY = "invalid_key"
    FAILED = "failed"


class WindowState(StrEnum):
    """A maintenance window's state, derived from its record and the time: closed by a
    custodian, used (every restart it allowed was taken), expired, or open."""

    OPEN = "open"
    EXPIRED = "expired"
    USED = "used"
    CLOSED = "closed"
