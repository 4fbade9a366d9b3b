"""What the escrow reads from its store alone, with no token: which shares a request may have
now, the requests still live, and what the metrics count (how many wait for custodians, the
nodes by state).

The service uses these for its answers, and the server's /metrics with no service at all:
the service is made only once the token answers, and the metrics must stay up while the HSM
is down, which is when on-call looks at them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from escrow.core.states import NodeState, RequestState
from escrow.service import fleet
from escrow.service.plan import Plan, approvers, plan, state_at
from escrow.store import RequestRecord, Store

NodeCount = Mapping[tuple[str, NodeState], int]


@dataclass(frozen=True)
class Tally:
    """What the metrics sample from the store at a scrape."""

    awaiting_approval: int
    nodes: NodeCount  # by (cluster, state)


def plan_of(store: Store, request: RequestRecord, max_versions: int) -> Plan:
    """Which shares ``request`` may have now (escrow.service.plan)."""
    versions = store.list_key_versions(request.cluster_id)[:max_versions]
    return plan(versions,
                {v.version: store.get_shares(request.cluster_id, v.version) for v in versions},
                set(approvers(store.list_approvals(request.request_id))), max_versions)


def live_requests(store: Store, now: datetime) -> list[RequestRecord]:
    """Requests still pending as of ``now`` (the store keeps expired ones as pending)."""
    return [r for r in store.list_requests(RequestState.PENDING)
            if state_at(r, now) == RequestState.PENDING]


def tally(store: Store, now: datetime, max_versions: int) -> Tally:
    """Counted from the fleet's status (escrow.service.fleet), so the metrics and the status
    page never disagree: a locked node whose request waits for custodians is ``waiting``."""
    clusters = fleet.clusters(fleet.read(store, max_versions), now, max_versions)
    return Tally(sum(len(c.requests) for c in clusters),
                 dict(Counter((c.cluster_id, n.state) for c in clusters for n in c.nodes)))
