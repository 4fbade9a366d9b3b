"""The escrow's request handling, free of HTTP: the server runs every call on the one thread
that owns the token and the database, and maps the exceptions raised here to statuses.

Each request is a straight line of two stages: *identify* the caller
(:mod:`~escrow.service.authentication`, refusals counted, never written), then do the work for
the identified party (refusals audited, :mod:`~escrow.service.refusals`). The work is split by
responsibility:

- :mod:`~escrow.service.enrollment`: agent keys and deposits;
- :mod:`~escrow.service.plan`: which shares a request may have (pure);
- :mod:`~escrow.service.release`: encrypting them to the request, once;
- :mod:`~escrow.service.unseal`: requests, their status and results;
- :mod:`~escrow.service.heartbeats` and :mod:`~escrow.service.liveness` (pure): which nodes
  are up, and which look cloned;
- :mod:`~escrow.service.custodians`: what custodians see and decide;
- :mod:`~escrow.service.windows` (pure) and :mod:`~escrow.service.maintenance`:
  maintenance windows, custodians' approvals given ahead of time;
- :mod:`~escrow.service.drills`: custodians proving their paper shares match, unsent;
- :mod:`~escrow.service.overdue` (pure): what time alone brings about (expiries, silent
  nodes), for the notifications;
- :mod:`~escrow.service.readings`: what the store alone tells (live requests, what they may
  have, nodes by state), which the server's metrics read without the service.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from escrow.audit import AuditEvent
from escrow.config import ServerSettings
from escrow.core.errors import Conflict, DiskFull, NotFound, Refusal, reason_of
from escrow.core.protocol import (
    BatchApproveRequest,
    BatchApproveResponse,
    BatchOutcome,
    DepositRequest,
    EnrollRequest,
    EnrollResponse,
    HeartbeatRequest,
    PendingRequest,
    ReleasedShare,
    RequestStatus,
    ResultReport,
    ShareDrills,
    ShareVerifyRequest,
    ShareVerifyResponse,
    UnsealRequest,
)
from escrow.core.states import Decision, RequestState
from escrow.nonces import NonceMinter
from escrow.notifications import events
from escrow.notifications.events import Event
from escrow.service import overdue
from escrow.service.authentication import Authenticator
from escrow.service.context import Context, Hooks
from escrow.service.custodians import Custodians
from escrow.service.drills import Drills
from escrow.service.enrollment import Enrollment
from escrow.service.heartbeats import Heartbeats
from escrow.service.refusals import Refusals, Unidentified
from escrow.service.unseal import Unseals
from escrow.stored_secrets import DEPOSIT_KEY, NONCE_KEY, wrapped_secret
from escrow.vault import DepositResult, Vault

CLAIM_MS = 24 * 3600 * 1000


class Escrow:
    """Every request kind the API serves, each as identify → admit → act."""

    def __init__(self, vault: Vault, settings: ServerSettings,
                 on_release: Callable[[int], None] = lambda count: None,
                 room: Callable[[], None] = lambda: None,
                 on_unidentified: Unidentified = lambda action, reason, source: None,
                 on_alert: Callable[[AuditEvent], None] = lambda event: None,
                 for_release: Callable[[], None] = lambda: None,
                 on_event: Callable[[Event], None] = lambda event: None) -> None:
        store = vault.store
        self.refusals = Refusals(store, room, on_unidentified, on_event, vault.clock)
        context = Context(vault, settings,
                          Hooks(on_release, room, on_alert, on_event, for_release),
                          self.refusals)
        self.context = context
        self.store = store
        deposit_key = X25519PrivateKey.from_private_bytes(
            wrapped_secret(store, vault.wrapper, DEPOSIT_KEY))
        # One secret for every replica, and the used ones in the store: a nonce issued by one
        # replica is good, once, at any other.
        self.nonces = NonceMinter(wrapped_secret(store, vault.wrapper, NONCE_KEY), vault.clock)
        self.auth = Authenticator(store, self.nonces, vault.clock, for_release)
        self.enrollment = Enrollment(context, deposit_key)
        self.heartbeats = Heartbeats(context)
        self.unseals = Unseals(context, self.heartbeats)
        self.windows = self.unseals.windows  # maintenance windows (escrow.service.maintenance)
        self.custodians = Custodians(context, self.auth)
        self.drills = Drills(context, self.auth)

    @property
    def deposit_public_key(self) -> bytes:
        return self.enrollment.deposit_public_key

    # -- nodes ------------------------------------------------------------------------------

    def enroll(self, body: EnrollRequest, source: str) -> EnrollResponse:
        with self.refusals.counted("enroll", source):
            verified = self.auth.verify_enroll(body)
        with self.refusals.audited("enroll", body.cluster_id, node_id=body.node_id,
                                   hostname=body.hostname, source=source):
            earlier = self.auth.admit_enrollment(verified, body)
            return self.enrollment.enroll(verified, body, earlier)

    def deposit(self, body: DepositRequest, source: str) -> DepositResult:
        with self.refusals.counted("deposit", source):
            verified = self.auth.verify_deposit(body)
        with self.refusals.audited("deposit", body.cluster_id, node_id=body.node_id,
                                   source=source):
            self.auth.admit(verified.node)
            return self.enrollment.deposit(verified, body)

    def unseal(self, body: UnsealRequest, source: str) -> RequestStatus:
        with self.refusals.counted("unseal", source):
            verified = self.auth.verify_unseal(body)
        with self.refusals.audited("unseal", body.cluster_id, node_id=body.node_id,
                                   hostname=body.hostname, boot_id=body.boot_id, source=source):
            self.auth.admit_unseal(verified, body)
            return self.unseals.open(verified, body, source)

    def heartbeat(self, body: HeartbeatRequest, source: str) -> None:
        with self.refusals.counted("heartbeat", source):
            verified = self.auth.verify_heartbeat(body)
        with self.refusals.audited("heartbeat", body.cluster_id, node_id=body.node_id,
                                   boot_id=body.boot_id, source=source):
            self.heartbeats.record(verified, body, source)

    def status(self, request_id: str) -> RequestStatus:
        return self.unseals.status(request_id)

    def due_in(self, request_id: str) -> float:
        return self.unseals.due_in(request_id)

    def report(self, request_id: str, body: ResultReport, source: str) -> None:
        with self.refusals.counted("unseal.result", source):
            verified = self.auth.verify_report(request_id, body)
        with self.refusals.audited("unseal.result", verified.request.cluster_id,
                                   request_id=request_id, node_id=body.node_id,
                                   outcome=body.outcome, version=body.version):
            self.auth.admit(verified.node)
            self.unseals.report(verified, body)

    # -- custodians -------------------------------------------------------------------------

    def authenticate_custodian(self, key_id: str, date: str, nonce: str, signature: str,
                               method: str, path: str, body: bytes, source: str = "") -> str:
        with self.refusals.counted("custodian", source):
            return self.auth.verify_custodian(key_id, date, nonce, signature, method, path,
                                              body)

    def pending(self, custodian: str) -> list[PendingRequest]:
        return self.custodians.pending(custodian)

    def decide(self, custodian: str, request_id: str, decision: Decision, signature: str,
               reason: str = "", batch: Mapping[str, object] | None = None,
               cluster_id: str = "") -> RequestStatus:
        request = self.custodians.decide(custodian, request_id, decision, signature, reason,
                                         batch, cluster_id)
        status = self.unseals.status(request.request_id)
        self.context.hooks.on_event(events.decided(
            request, decision, custodian, reason, len(status.approvals), status.needed,
            self.context.now()))
        return status

    def approve_batch(self, custodian: str, body: BatchApproveRequest
                      ) -> BatchApproveResponse:
        """Approve the requests of one cluster at once (a power cut), each as a single
        approval would be; one refused (expired, decided, of another cluster) leaves the
        others approved and is named in the answer."""
        batch_id = "b-" + secrets.token_hex(10)
        batch = {"batch_id": batch_id, "batch_size": len(body.approvals)}
        results = []
        for item in body.approvals:
            try:
                status = self.decide(custodian, item.request_id, Decision.APPROVE,
                                     item.signature, "", batch, body.cluster_id)
            except DiskFull:
                raise
            except (Refusal, Conflict, NotFound) as exc:  # about this request: the rest go on
                results.append(BatchOutcome(request_id=item.request_id, state=None,
                                            approvals=[], error=reason_of(exc),
                                            message=exc.message))
                continue
            results.append(BatchOutcome(request_id=item.request_id,
                                        state=status.state,
                                        approvals=status.approvals, error="", message=""))
        return self.custodians.record_batch(custodian, body.cluster_id, batch_id, results)

    def export_share(self, custodian: str, cluster_id: str,
                     ephemeral_b64: str) -> ReleasedShare:
        return self.custodians.export_share(custodian, cluster_id, ephemeral_b64)

    def share_drills(self, custodian: str, cluster_id: str) -> ShareDrills:
        return self.drills.listing(custodian, cluster_id)

    def verify_share(self, custodian: str, body: ShareVerifyRequest) -> ShareVerifyResponse:
        return self.drills.verify(custodian, body)

    # -- notifications ----------------------------------------------------------------------

    def claim(self, event: Event) -> bool:
        """Whether this replica sends ``event``: True for the first to claim it in the store
        shared by every replica (each claim is kept a day, far longer than any replica
        could take to see the same occurrence)."""
        now_ms = int(self.context.now().timestamp() * 1000)
        return self.store.use_once(event.claim_key, now_ms + CLAIM_MS, now_ms)

    def due(self, start: datetime, now: datetime) -> list[Event]:
        """What time brought about in [start, now) (escrow.service.overdue): expired requests
        and active nodes gone silent."""
        found = [events.expired(r, self.context.plan(r).needed) for r in overdue.expired(
            self.store.list_requests(RequestState.PENDING), start, now)]
        return found + [events.node_unreachable(node, beat, moment)
                        for node, beat, moment in overdue.went_silent(
                            self.store.list_nodes(), self.store.latest_heartbeats(), start, now)]
