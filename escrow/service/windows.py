"""Maintenance windows, decided from their records and the clock (pure): a window's state,
whether it applies to a new request, and the approvals it gives one.

A window is custodians' approval given ahead of time: each signer's signature over the
window's facts (escrow.core.protocol.window_payload) counts as that signer's approval of up to
``restarts`` requests, in all, of the nodes it names, until it expires or is closed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

from escrow.audit import AuditEvent
from escrow.core.states import Decision, WindowState
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.store import ApprovalRecord, RequestRecord, WindowClaim, WindowRecord


def state(window: WindowRecord, now: datetime) -> WindowState:
    """Closed first (a custodian ended it), then used up, then expired."""
    if window.closed_at:
        return WindowState.CLOSED
    if window.used >= window.restarts:
        return WindowState.USED
    if now >= parse_timestamp(window.expires_at):
        return WindowState.EXPIRED
    return WindowState.OPEN


def counted_signers(window: WindowRecord, eligible: Collection[str]) -> list[str]:
    """The signers whose approval the window gives: those who still hold a slot of a key
    version a request may release (a signer who lost theirs approves nothing)."""
    return [custodian for custodian in window.signatures if custodian in eligible]


def applies(window: WindowRecord, request: RequestRecord, now: datetime,
            eligible: Collection[str]) -> bool:
    """Whether ``window`` approves ``request`` now: of its cluster and one of its nodes,
    open with a restart left, and signed by at least one custodian whose approval counts."""
    return (window.cluster_id == request.cluster_id and request.node_id in window.nodes
            and state(window, now) == WindowState.OPEN
            and bool(counted_signers(window, eligible)))


def choose(windows: Sequence[WindowRecord], request: RequestRecord, now: datetime,
           eligible: Collection[str]) -> WindowRecord | None:
    """The window a new request is approved by, if any: of those that apply, the one giving
    the most approvals, then the one ending soonest (so a longer one keeps its restarts)."""
    fitting = [w for w in windows if applies(w, request, now, eligible)]
    if not fitting:
        return None
    return min(fitting, key=lambda w: (-len(counted_signers(w, eligible)),
                                       parse_timestamp(w.expires_at), w.window_id))


def claim(window: WindowRecord, request: RequestRecord, now: datetime,
          eligible: Collection[str]) -> WindowClaim:
    """One restart of ``window`` for ``request``: an approval per counted signer, whose
    signature is their signature of the window, each audited with the window's id."""
    at = timestamp(now)
    approvals = []
    for custodian in counted_signers(window, eligible):
        signature = window.signatures[custodian]
        approval = ApprovalRecord(request.request_id, custodian, Decision.APPROVE, signature,
                                  f"approved by maintenance window {window.window_id}", at,
                                  window_id=window.window_id)
        approvals.append((approval, AuditEvent(
            "window.approve", f"custodian:{custodian}", request.cluster_id,
            {"request_id": request.request_id, "node_id": request.node_id,
             "window_id": window.window_id, "signature": signature})))
    return WindowClaim(window.window_id, at, approvals)


def window_approvals(approvals: Sequence[ApprovalRecord]) -> Mapping[str, str]:
    """Custodian -> window id, for the approvals a window gave."""
    return {a.custodian: a.window_id for a in approvals
            if a.window_id and a.decision == Decision.APPROVE}
