"""Persistence behind one narrow interface.

Every mutation appends its audit record in the same transaction, so the log and the data can
never disagree. Two backends implement the :class:`Store` protocol with the same queries
(``escrow.store.sql``): SQLite (``escrow.store.sqlite``, the embedded default) and PostgreSQL
(``escrow.store.postgres``); ``escrow.store.opening`` picks one from ``store.url``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from escrow.audit import AuditEvent, AuditRecord, Checkpoint
from escrow.core.states import Decision, LockState, NodeStatus, Outcome, RequestState
from escrow.policy import Policy

StoreKind = Literal["sqlite", "postgresql"]


@dataclass(frozen=True)
class CustodianRecord:
    name: str
    public_key_pem: str
    created_at: str


@dataclass(frozen=True)
class Unlock:
    """A node's unlock, as its agent reported it."""

    version: int
    at: str


@dataclass(frozen=True)
class ViewerRecord:
    """Who may read the fleet's status (the page, `escrow status`): by a token whose SHA-256
    alone is kept."""

    name: str
    token_sha256: str
    created_at: str


@dataclass(frozen=True)
class ClusterRecord:
    cluster_id: str
    root_ca_pem: str
    policy: Policy
    created_at: str
    # Deny window: a request that needs approvals proceeds this long after it was made unless
    # a custodian denies it; 0 (the default) waits for custodians however long it takes.
    approve_after_seconds: int = 0


@dataclass(frozen=True)
class KeyVersionRecord:
    cluster_id: str
    version: int
    fingerprint: str
    policy: Policy  # the policy the key was split under; later policy changes do not alter it
    created_at: str


@dataclass(frozen=True)
class ShareRecord:
    """One wrapped share. ``wrapped`` is AES-GCM ciphertext from the token, never plaintext."""

    cluster_id: str
    version: int
    slot: int
    holder: str
    wrapped: bytes


@dataclass(frozen=True)
class NodeRecord:
    cluster_id: str
    node_id: str
    agent_public_key_pem: str
    hostname: str
    enrolled_at: str
    status: NodeStatus


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    cluster_id: str
    node_id: str
    hostname: str
    boot_id: str
    source: str
    cert_pem: str
    ephemeral_key: bytes
    kek_version: str
    created_at: str
    expires_at: str
    state: RequestState  # as stored: never expired (time tells) or ready (shares tell)
    reason: str = ""
    # While another boot of the node may still be alive (escrow.service.liveness), nothing is
    # released before this time; "" for a request that waits on no one.
    held_until: str = ""


@dataclass(frozen=True)
class HeartbeatRecord:
    """The latest heartbeat of one boot of a node (a node keeps a row per recent boot id)."""

    cluster_id: str
    node_id: str
    boot_id: str
    first_at: str  # this boot's first beat
    last_at: str
    lock_state: LockState
    kek_version: str
    agent_version: str
    uptime_seconds: int
    interval_seconds: int
    goodbye: bool
    source: str


@dataclass(frozen=True)
class ApprovalRecord:
    request_id: str
    custodian: str
    decision: Decision
    signature: str
    reason: str
    created_at: str
    # Given on the authority of this maintenance window (its signature, not one over the
    # request's facts); "" for a custodian's own decision.
    window_id: str = ""


@dataclass(frozen=True)
class WindowRecord:
    """A maintenance window: restarts of named nodes pre-approved until ``expires_at``, at most
    ``restarts`` requests in all; each custodian's signature counts as their approval."""

    window_id: str
    cluster_id: str
    nodes: tuple[str, ...]
    restarts: int
    used: int
    expires_at: str
    reason: str
    created_at: str
    closed_at: str = ""
    closed_by: str = ""
    signatures: Mapping[str, str] = field(default_factory=dict)  # custodian -> signature


@dataclass(frozen=True)
class WindowClaim:
    """One restart of a window, taken in the transaction that writes the request it approves:
    ``approvals`` (each with its audit event) are written only if, at ``now``, the window is
    still open with a restart left; otherwise the whole write fails with WindowTaken."""

    window_id: str
    now: str
    approvals: Sequence[tuple[ApprovalRecord, AuditEvent]]


@dataclass(frozen=True)
class DrillRecord:
    """The last time a custodian proved their paper share of one key version matches."""

    cluster_id: str
    version: int
    slot: int
    custodian: str
    last_ok_at: str


MakeShares = Callable[[int], Sequence[ShareRecord]]


class Store(Protocol):
    def close(self) -> None: ...

    kind: StoreKind

    def replicas(self) -> list[str]:
        """The hosts with an escrow connected to a shared store now (none on SQLite)."""
        ...

    def check_writable(self) -> StoreKind:
        """The kind of database; raise StoreError unless it answers and accepts writes."""
        ...

    def add_custodian(self, record: CustodianRecord, event: AuditEvent) -> None: ...
    def remove_custodian(self, name: str, event: AuditEvent) -> None: ...
    def get_custodian(self, name: str) -> CustodianRecord: ...
    def list_custodians(self) -> list[CustodianRecord]: ...

    def add_viewer(self, record: ViewerRecord, event: AuditEvent) -> None: ...
    def remove_viewer(self, name: str, event: AuditEvent) -> None: ...
    def list_viewers(self) -> list[ViewerRecord]: ...
    def viewer_named_by(self, token_sha256: str) -> str | None:
        """The viewer whose token has this SHA-256, if any."""
        ...

    def add_cluster(self, record: ClusterRecord, event: AuditEvent) -> None: ...
    def set_policy(self, cluster_id: str, policy: Policy, event: AuditEvent) -> None: ...
    def set_approve_after(self, cluster_id: str, seconds: int, event: AuditEvent) -> None:
        """Set the cluster's deny window (0: off)."""
        ...
    def get_cluster(self, cluster_id: str) -> ClusterRecord: ...
    def list_clusters(self) -> list[ClusterRecord]: ...

    def add_key_version(
        self, cluster_id: str, fingerprint: str, policy: Policy, make_shares: MakeShares,
        event: AuditEvent,
    ) -> tuple[KeyVersionRecord, bool]:
        """Add a version holding the shares ``make_shares(version)`` returns, all or nothing.
        If ``fingerprint`` is already stored, return that version and False, adding nothing."""
        ...

    def list_key_versions(self, cluster_id: str) -> list[KeyVersionRecord]:
        """Newest first."""
        ...

    def get_shares(self, cluster_id: str, version: int) -> list[ShareRecord]: ...
    def delete_key_versions(
        self, cluster_id: str, versions: Sequence[int], event: AuditEvent
    ) -> None:
        """Delete the versions, their shares and their drills."""
        ...

    def record_drill(self, record: DrillRecord, event: AuditEvent) -> None:
        """Keep ``record`` as its slot's last successful drill, with ``event``, in one
        transaction."""
        ...

    def list_drills(self, cluster_id: str) -> list[DrillRecord]:
        """The last successful drill of every slot drilled, newest version first."""
        ...

    def rewrap(self, share: Callable[[ShareRecord], bytes],
               meta: Mapping[str, Callable[[bytes], bytes]], event: AuditEvent) -> int: ...

    def get_meta(self, name: str) -> bytes | None: ...
    def add_meta(self, name: str, value: bytes, event: AuditEvent) -> bytes:
        """Store ``value`` under ``name`` unless a value is there already; return the one
        stored (audited only if it is ``value``)."""
        ...

    def enroll_node(self, record: NodeRecord, event: AuditEvent) -> None:
        """Insert or replace the node's agent key; a revoked node stays revoked."""
        ...

    def get_node(self, cluster_id: str, node_id: str) -> NodeRecord | None: ...
    def list_nodes(self) -> list[NodeRecord]: ...
    def set_node_status(self, cluster_id: str, node_id: str, status: NodeStatus,
                        event: AuditEvent) -> None: ...

    def create_request(self, record: RequestRecord, event: AuditEvent,
                       released: Sequence[tuple[int, int, str]] = (),
                       release_event: AuditEvent | None = None,
                       window: WindowClaim | None = None) -> list[str]:
        """Insert a request, superseding the node's other pending ones (returned), with the
        shares released to it at once, if any, as record_releases notes them, in the same
        transaction; with ``window``, one of its restarts and its approvals too, or nothing
        at all (WindowTaken) when it has none left."""
        ...

    def count_requests_since(self, cluster_id: str, node_id: str, since: str, *,
                             unconfirmed: bool = False) -> int:
        """Requests of the node created since ``since``; with ``unconfirmed``, only those
        no report says unlocked the manager."""
        ...

    def pending_requests_of(self, cluster_id: str, node_id: str) -> list[RequestRecord]: ...
    def get_request(self, request_id: str) -> RequestRecord | None: ...

    def record_heartbeat(self, record: HeartbeatRecord, event: AuditEvent | None) -> None:
        """Keep ``record`` as its boot's latest beat (the first beat of a boot sets
        ``first_at``), with the audit ``event`` if there is one; older boots beyond the few
        kept are forgotten."""
        ...

    def heartbeats(self, cluster_id: str, node_id: str) -> list[HeartbeatRecord]:
        """The node's recent boots' latest beats, the latest first."""
        ...

    def latest_heartbeats(self) -> dict[tuple[str, str], HeartbeatRecord]:
        """Every node's latest beat, by (cluster id, node id)."""
        ...
    def list_requests(self, state: RequestState) -> list[RequestRecord]: ...
    def set_request_state(self, request_id: str, state: RequestState, reason: str,
                          event: AuditEvent) -> None: ...
    def add_approval(self, record: ApprovalRecord, event: AuditEvent) -> None: ...
    def list_approvals(self, request_id: str) -> list[ApprovalRecord]: ...
    def open_window(self, record: WindowRecord, event: AuditEvent) -> None:
        """Insert a window with its signatures (Conflict if its id is taken)."""
        ...

    def sign_window(self, window_id: str, custodian: str, signature: str, created_at: str,
                    event: AuditEvent) -> None:
        """Add a co-signature (Conflict if the custodian signed already or the window was
        closed meanwhile)."""
        ...

    def get_window(self, window_id: str) -> WindowRecord | None: ...
    def list_windows(self, cluster_id: str | None = None, *,
                     open_at: str | None = None) -> list[WindowRecord]:
        """Newest first; with ``open_at``, only those not closed, with a restart left and
        expiring after that moment."""
        ...

    def close_window(self, window_id: str, closed_by: str, closed_at: str,
                     event: AuditEvent) -> None:
        """Close a window for good (Conflict if it was closed already)."""
        ...

    def list_releases(self, request_id: str) -> list[tuple[int, int, str]]:
        """(version, slot, holder) of every share released to the request."""
        ...

    def record_releases(self, request_id: str, released: Sequence[tuple[int, int, str]],
                        event: AuditEvent) -> int:
        """Note shares released to a request; audits and counts only the ones not released
        before."""
        ...

    def record_result(self, request_id: str, version: int, outcome: Outcome,
                      event: AuditEvent) -> Outcome | None:
        """Record an agent's outcome for one version of a request, once (``unlocked``
        completes the request); the earlier outcome when there was one, writing nothing."""
        ...

    def list_results(self, request_id: str) -> dict[int, Outcome]: ...
    def last_unlocks(self, cluster_id: str) -> dict[str, Unlock]:
        """Each node's most recent successful unlock, by node id."""
        ...

    def use_once(self, key: bytes, expires_ms: int, now_ms: int) -> bool:
        """Record ``key`` until ``expires_ms`` (Unix time, ms); False if it is recorded
        already. Every process sharing the store sees the same set, so a nonce or a signed
        custodian request is used once across replicas, and across restarts."""
        ...

    def listen(self, on_decided: Callable[[str | None], None]) -> None:
        """Call ``on_decided(request_id)`` (from another thread) once a custodian's decision
        on the request commits, in any process sharing the store; ``None`` when some may
        have been missed."""
        ...

    def count_audit_since(self, event: str, actor: str, since: str) -> int: ...

    def append_audit(self, event: AuditEvent) -> AuditRecord: ...

    def iter_audit(self, after_seq: int = 0, cluster_id: str | None = None,
                   through_seq: int | None = None) -> Iterator[AuditRecord]:
        """Records in chain order (seq ascending), ``after_seq`` < seq <= ``through_seq``,
        read in batches from one consistent read: memory stays flat however long the log."""
        ...

    def latest_audit(self, limit: int, cluster_id: str | None = None) -> list[AuditRecord]:
        """The newest ``limit`` records (of one cluster), oldest first, reading only those."""
        ...

    def audit_snapshot(self) -> AbstractContextManager[None]:
        """Reads inside agree with each other (checkpoints and records), even while an
        archive commits."""
        ...

    def audit_checkpoints(self) -> list[Checkpoint]:
        """Every archive checkpoint, oldest first; the database's chain continues from the
        last one."""
        ...

    def archive_audit(self, checkpoint: Checkpoint, event: AuditEvent) -> AuditRecord:
        """In one transaction: keep ``checkpoint``, delete the records it covers (already
        written to its archive file), append ``event`` with its details. Refuses unless exactly
        the records it describes are there."""
        ...
