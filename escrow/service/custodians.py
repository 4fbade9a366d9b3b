"""What custodians see and decide: the live requests of the clusters where they hold a slot,
their approvals and denials, and the export of their own share."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from escrow.audit import AuditEvent
from escrow.core import protocol
from escrow.core.errors import IdentityError, RequestError
from escrow.core.protocol import (
    HPKE,
    BatchApproveResponse,
    BatchOutcome,
    PendingRequest,
    ReleasedShare,
)
from escrow.core.states import Decision, RequestState
from escrow.core.timestamps import timestamp
from escrow.service import fields, readings, windows
from escrow.service.authentication import Authenticator
from escrow.service.context import Context
from escrow.service.plan import approvers, state_at
from escrow.store import ApprovalRecord, RequestRecord


class Custodians:
    def __init__(self, context: Context, authenticator: Authenticator) -> None:
        self.context = context
        self.store = context.store
        self.authenticator = authenticator

    def _holds_slot(self, custodian: str, cluster_id: str) -> bool:
        """Whether ``custodian`` holds a slot of the cluster's policy or of a retained
        version (a request can release shares of either)."""
        cluster = self.store.get_cluster(cluster_id)
        policies = [cluster.policy] + [v.policy for v in self.store.list_key_versions(
            cluster_id)[: self.context.settings.max_versions]]
        return any(custodian in policy.slots for policy in policies)

    def _view(self, request: RequestRecord, custodian: str) -> PendingRequest:
        cert = x509.load_pem_x509_certificate(request.cert_pem.encode("ascii"))
        plan = self.context.plan(request)
        decisions = self.store.list_approvals(request.request_id)
        return PendingRequest(
            request_id=request.request_id, cluster_id=request.cluster_id,
            node_id=request.node_id, hostname=request.hostname, boot_id=request.boot_id,
            source=request.source, created_at=request.created_at, expires_at=request.expires_at,
            approvals=approvers(decisions), threshold=plan.threshold,
            needed=plan.needed, cert_not_after=timestamp(cert.not_valid_after_utc),
            cert_sha256=protocol.sha256_hex(cert.public_bytes(serialization.Encoding.DER)),
            cert_serial=str(cert.serial_number),
            ephemeral_public_key=protocol.b64e(request.ephemeral_key),
            eligible=plan.eligible(custodian),
            approves_by_default_at=self.context.approves_by_default_at(request),
            window_approvals=dict(windows.window_approvals(decisions)),
            decided=any(a.custodian == custodian for a in decisions))

    def pending(self, custodian: str) -> list[PendingRequest]:
        """Live requests of the clusters where ``custodian`` holds a slot: what a node sent
        (hostname, source address, boot id) is shown to those who decide on it, no one else."""
        mine: dict[str, bool] = {}
        views = []
        for request in readings.live_requests(self.store, self.context.now()):
            if request.cluster_id not in mine:
                mine[request.cluster_id] = self._holds_slot(custodian, request.cluster_id)
            if mine[request.cluster_id]:
                views.append(self._view(request, custodian))
        return views

    def decide(self, custodian: str, request_id: str, decision: Decision, signature: str,
               reason: str, batch: Mapping[str, object] | None = None,
               cluster_id: str = "") -> RequestRecord:
        """Record an approval or denial; refusals are audited. ``batch`` (its id and size)
        goes into the audit record of an approval given with others at once, all of whose
        requests must be of ``cluster_id``."""
        request = self.store.get_request(request_id)
        if request is None:
            raise RequestError("unknown_request", f"no request {request_id}", status=404)
        with self.context.refusals.audited(f"custodian.{decision}", request.cluster_id,
                                           request_id=request_id, custodian=custodian,
                                           **(batch or {})):
            if cluster_id and request.cluster_id != cluster_id:
                raise RequestError("other_cluster", f"request {request_id} is of cluster "
                                   f"{request.cluster_id}, not {cluster_id}",
                                   "a batch approves the requests of one cluster", 409)
            # Eligibility first: the request's state is none of a non-holder's business.
            view = self._view(request, custodian)
            if not view.eligible:
                raise IdentityError("not_a_custodian", f"{custodian} holds no share of "
                                    f"{request.cluster_id}", "only slot holders decide")
            state = state_at(request, self.context.now())
            if state != RequestState.PENDING:
                raise RequestError("not_pending", f"request {request_id} is {state}",
                                   "only pending requests can be decided", 409)
            if view.decided:  # the store refuses it too; here it is audited
                raise RequestError("already_decided", f"{custodian} has already decided on "
                                   f"{request_id}", "each custodian decides once per request: "
                                   "a second approval counts for nothing", 409)
            self.authenticator.verify_decision(custodian, decision, view, reason, signature)
        self.context.hooks.for_release()
        self.store.add_approval(
            ApprovalRecord(request_id, custodian, decision, signature, reason,
                           timestamp(self.context.now())),
            AuditEvent(f"custodian.{decision}", f"custodian:{custodian}", request.cluster_id,
                       {"request_id": request_id, "node_id": request.node_id,
                        "signature": signature, "reason": reason, **(batch or {})}))
        return request

    def record_batch(self, custodian: str, cluster_id: str, batch_id: str,
                     results: Sequence[BatchOutcome]) -> BatchApproveResponse:
        """Audit a batch of approvals (after a power cut) once, with what was refused; each
        approval's own record names the batch too."""
        self.store.append_audit(AuditEvent(
            "custodian.approve_batch", f"custodian:{custodian}", cluster_id,
            {"batch_id": batch_id, "approved": [r.request_id for r in results if not r.error],
             "refused": {r.request_id: r.error for r in results if r.error}}))
        return BatchApproveResponse(batch_id=batch_id, results=list(results))

    def export_share(self, custodian: str, cluster_id: str,
                     ephemeral_b64: str) -> ReleasedShare:
        ephemeral = fields.ephemeral(ephemeral_b64)
        versions = self.store.list_key_versions(cluster_id)
        if not versions:
            raise RequestError("no_key", f"{cluster_id} has no key deposited yet", status=404)
        newest = versions[0]
        mine = [s for s in self.store.get_shares(cluster_id, newest.version)
                if hmac.compare_digest(s.holder, custodian)]
        if not mine:
            error = IdentityError("not_a_custodian", f"{custodian} holds no share of version "
                                  f"{newest.version} of {cluster_id}",
                                  "only the holder of a slot can export it")
            self.context.refusals.audit("share.export", error, cluster_id, custodian=custodian)
            raise error
        share = mine[0]
        info = protocol.share_info("export", cluster_id, share.version, share.slot)
        encrypted = HPKE.encrypt(self.context.vault.unwrap_share(share).encode("ascii"),
                                 X25519PublicKey.from_public_bytes(ephemeral), info=info)
        self.store.append_audit(AuditEvent("share.export", f"custodian:{custodian}", cluster_id,
                                           {"version": share.version, "slot": share.slot}))
        return ReleasedShare(version=share.version, fingerprint=newest.fingerprint,
                             slot=share.slot, holder=share.holder,
                             sealed_share=protocol.b64e(encrypted))
