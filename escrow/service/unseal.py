"""Unseal requests: opening one, its status (where shares are released), and the node's
report of what unlocked it."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import datetime, timedelta

from escrow.audit import AuditEvent
from escrow.core.durations import describe
from escrow.core.errors import RequestError, WindowTaken
from escrow.core.protocol import ReleasedShare, RequestStatus, ResultReport, UnsealRequest
from escrow.core.states import Outcome, RequestState
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.notifications import events
from escrow.service.authentication import VerifiedReport, VerifiedUnseal
from escrow.service.context import Context
from escrow.service.heartbeats import Heartbeats
from escrow.service.liveness import is_held
from escrow.service.maintenance import MaintenanceWindows
from escrow.service.plan import Plan, state_at
from escrow.service.release import Releases
from escrow.store import RequestRecord, WindowClaim

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# All requests of a node in the window, unlocked or not, may be this many times the limit on
# requests that did not unlock: 30 dockerd restarts in 10 minutes pass, a flood does not.
ALL_REQUESTS_FACTOR = 6


def _release_event(request: RequestRecord) -> AuditEvent:
    return AuditEvent("unseal.release", "escrow", request.cluster_id,
                      {"request_id": request.request_id, "node_id": request.node_id})


def _approvers(claim: WindowClaim | None) -> list[str]:
    return [approval.custodian for approval, _ in claim.approvals] if claim else []


class Unseals:
    def __init__(self, context: Context, heartbeats: Heartbeats) -> None:
        self.context = context
        self.heartbeats = heartbeats
        self.store = context.store
        self.settings = context.settings
        self.hooks = context.hooks
        self.releases = Releases(context.vault.unwrap_share)
        self.windows = MaintenanceWindows(context)

    def open(self, verified: VerifiedUnseal, body: UnsealRequest, source: str) -> RequestStatus:
        """Record a new request from an admitted node, within its rate limit; held while
        another boot of the node may still be alive (escrow.service.liveness)."""
        now = self.context.now()
        self._within_limits(body, now)
        held_until = self.heartbeats.hold_until(body.cluster_id, body.node_id, body.boot_id,
                                                now)
        request_id = "r-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))
        self.hooks.for_release()
        record = RequestRecord(
            request_id, body.cluster_id, body.node_id, body.hostname, body.boot_id, source,
            body.node_cert, verified.ephemeral, body.kek_version, timestamp(now),
            timestamp(now + timedelta(seconds=self.settings.request_ttl_seconds)),
            RequestState.PENDING, held_until=held_until)
        alone = self.context.plan(record)
        claim = None
        if alone.needed > 0:
            record = self._deny_window(record, now)
            # A window's restart is taken only by a request that needs its approvals.
            claim = self.windows.claim_for(record, now)
        event = AuditEvent(
            "unseal.request", f"node:{body.node_id}", body.cluster_id,
            {"request_id": request_id, "node_id": body.node_id, "hostname": body.hostname,
             "boot_id": body.boot_id, "source": source, "kek_version": body.kek_version,
             "cert_serial": str(verified.cert.serial_number), "held_until": held_until})
        try:
            plan, released, fresh = self._create(record, event, claim, now, alone)
        except WindowTaken:
            # Another request took the window's last restart (or it was closed) meanwhile:
            # this one waits for custodians like any other.
            claim = None
            plan, released, fresh = self._create(record, event, claim, now, alone)
        if fresh:
            self.hooks.on_release(len(fresh))
        if plan.needed > 0:
            self.hooks.on_event(events.requested(
                record, plan.needed, now, self.context.approves_by_default_at(record)))
        ready = not is_held(record, now) and plan.needed == 0
        return self._answer(record, RequestState.READY if ready else RequestState.PENDING,
                            plan, released, _approvers(claim))

    def _create(self, record: RequestRecord, event: AuditEvent, claim: WindowClaim | None,
                now: datetime, alone: Plan) -> tuple[Plan, list[ReleasedShare],
                                                     list[ReleasedShare]]:
        """Write the request with what an automatic policy (and the window it claims, if any)
        releases at once, in one transaction: one commit (and fsync) per unseal, not two.
        ``alone``: the request's plan without the window."""
        plan = self.context.plan(record, _approvers(claim)) if claim else alone
        held = is_held(record, now)
        released, fresh = ([], []) if held else self.releases.encrypt_to(record, plan)
        try:
            self.store.create_request(record, event, [(r.version, r.slot, r.holder)
                                                      for r in fresh],
                                      _release_event(record), claim)
        except BaseException:
            self.releases.forget(record.request_id)
            raise
        return plan, released, fresh

    def _deny_window(self, record: RequestRecord, now: datetime) -> RequestRecord:
        """A request of a cluster with a deny window expires that much later, so it is not
        gone before it may proceed."""
        delay = self.store.get_cluster(record.cluster_id).approve_after_seconds
        if not delay:
            return record
        return replace(record, expires_at=timestamp(
            now + timedelta(seconds=delay + self.settings.request_ttl_seconds)))

    def _within_limits(self, body: UnsealRequest, now: datetime) -> None:
        """Requests that did not end in a reported unlock are limited, so a manager whose
        dockerd restarts often is never locked out, while a node that keeps asking without
        unlocking (or a thief with its key) is; all requests are limited too, far higher."""
        window = self.settings.rate_window_seconds
        since = timestamp(now - timedelta(seconds=window))
        limit = self.settings.rate_limit
        unconfirmed = self.store.count_requests_since(body.cluster_id, body.node_id, since,
                                                      unconfirmed=True)
        if unconfirmed >= limit:
            raise RequestError("rate_limited",
                               f"node {body.node_id} made {limit} requests in {window:g} s "
                               "that did not unlock it",
                               "wait and retry; an agent backs off by itself", 429,
                               retry_after=window)
        everything = self.store.count_requests_since(body.cluster_id, body.node_id, since)
        if everything >= ALL_REQUESTS_FACTOR * limit:
            raise RequestError("rate_limited",
                               f"node {body.node_id} made {everything} requests in {window:g} s",
                               "a manager restarting this often needs looking at; an agent "
                               "backs off by itself", 429, retry_after=window)

    def status(self, request_id: str) -> RequestStatus:
        """The request's state; while it is pending, the shares its plan allows, released
        (recorded and audited) the first time each is given."""
        request = self.store.get_request(request_id)
        if request is None:
            raise RequestError("unknown_request", f"no request {request_id}",
                               "send a new unseal request", 404)
        now = self.context.now()
        state = state_at(request, now)
        plan = self.context.plan(request)
        released: list[ReleasedShare] = []
        if state != RequestState.PENDING:
            self.releases.forget(request_id)
        elif not is_held(request, now):  # held: another boot of the node may still be alive
            released, fresh = self.releases.encrypt_to(request, plan)
            if fresh:
                self.hooks.for_release()
                by_default = self._by_default(request, plan, fresh)
                count = self.store.record_releases(
                    request_id, [(r.version, r.slot, r.holder) for r in fresh],
                    by_default or _release_event(request))
                self.hooks.on_release(count)
                if by_default and count:  # on-call hears of an unseal no human approved
                    self.hooks.on_alert(by_default)
            if plan.needed == 0:
                state = RequestState.READY
        return self._answer(request, state, plan, released,
                            self.context.approvers(request_id))

    def _by_default(self, request: RequestRecord, plan: Plan,
                    fresh: list[ReleasedShare]) -> AuditEvent | None:
        """The release's audit record when the deny window gives shares no custodian
        approved: written once, with the releases, in their transaction."""
        holders = sorted({r.holder for r in fresh} & plan.by_default)
        if not holders:
            return None
        delay = self.store.get_cluster(request.cluster_id).approve_after_seconds
        return AuditEvent("unseal.approved_by_default", "escrow", request.cluster_id,
                          {"request_id": request.request_id, "node_id": request.node_id,
                           "message": f"approved by default after {describe(delay)}: no "
                                      "custodian denied it",
                           "approve_after_seconds": delay, "in_place_of": holders})

    def _answer(self, request: RequestRecord, state: RequestState, plan: Plan,
                released: list[ReleasedShare], approvals: list[str]) -> RequestStatus:
        return RequestStatus(
            request_id=request.request_id, cluster_id=request.cluster_id,
            node_id=request.node_id, state=state.value,
            created_at=request.created_at, expires_at=request.expires_at,
            threshold=plan.threshold, needed=plan.needed, approvals=approvals,
            # Why it ended, for a denial or a revocation ("node quarantined", say).
            denial_reason=(request.reason if state in (RequestState.DENIED,
                                                        RequestState.REVOKED) else ""),
            releases=released)

    def due_in(self, request_id: str) -> float:
        """Seconds until time alone may give ``request_id`` shares: its hold ends, or its
        cluster's deny window passes (0: nothing is due)."""
        request = self.store.get_request(request_id)
        now = self.context.now()
        if request is None or state_at(request, now) != RequestState.PENDING:
            return 0.0
        moments = [request.held_until, self.context.approves_by_default_at(request)]
        ahead = [(parse_timestamp(m) - now).total_seconds() for m in moments if m]
        return min((s for s in ahead if s > 0), default=0.0)

    def report(self, verified: VerifiedReport, body: ResultReport) -> None:
        """One outcome per version, and only about shares this request was given: a replayed
        report changes nothing, and no report turns a denied request into a completed one."""
        request = verified.request
        outcome = Outcome(body.outcome)
        reported = self.store.list_results(request.request_id).get(body.version)
        # After the unlock, stragglers (the versions tried before it) and retries still count.
        late = request.state == RequestState.COMPLETED and (outcome != Outcome.UNLOCKED
                                                            or reported == Outcome.UNLOCKED)
        if request.state != RequestState.PENDING and not late:
            raise RequestError("not_pending", f"request {request.request_id} is "
                               f"{request.state}: no result is taken for it",
                               "results are reported only for requests that released shares",
                               409)
        if body.version not in {v for v, _, _ in self.store.list_releases(request.request_id)}:
            raise RequestError("not_released", f"request {request.request_id} was given no "
                               f"share of version {body.version}",
                               "report only versions the request released", 409)
        self.hooks.for_release()
        earlier = self.store.record_result(
            request.request_id, body.version, outcome,
            AuditEvent("unseal.result", f"node:{body.node_id}", request.cluster_id,
                       {"request_id": request.request_id, "outcome": body.outcome,
                        "version": body.version}))
        if earlier is not None and earlier != outcome:
            raise RequestError("already_reported", f"version {body.version} of request "
                               f"{request.request_id} was reported {earlier} already",
                               "each version's outcome is reported once", 409)
        if earlier is None and outcome == Outcome.UNLOCKED:
            self.hooks.on_event(events.unlocked(request, body.version, self.context.now()))
            self._unconfirmed(request, body.version)

    def _unconfirmed(self, request: RequestRecord, version: int) -> None:
        """Newer versions that this node was given and that did not unlock it: expected once
        for a node that was down during a rotation, otherwise a deposit that was never the
        swarm's key (a junk deposit from a compromised node)."""
        refused = sorted(v for v, outcome in self.store.list_results(request.request_id).items()
                         if outcome == Outcome.INVALID_KEY and v > version)
        if refused:
            event = AuditEvent("key.unconfirmed", "escrow", request.cluster_id,
                               {"request_id": request.request_id, "node_id": request.node_id,
                                "unlocked_with": version, "refused_versions": refused})
            self.store.append_audit(event)
            self.hooks.on_alert(event)
