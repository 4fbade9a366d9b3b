"""What the escrow reads from its store alone, with no token: which shares a request may have
now, the requests still live, the custodians' share drills, and what the metrics count (how
many wait for custodians, the nodes by state, how long since each cluster's shares were
drilled).

The service uses these for its answers, and the server's /metrics with no service at all:
the service is made only once the token answers, and the metrics must stay up while the HSM
is down, which is when on-call looks at them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from escrow.core.states import NodeState, RequestState
from escrow.core.timestamps import parse_timestamp
from escrow.policy import AUTO
from escrow.service import fleet
from escrow.service.plan import Plan, approved_by_default, approvers, plan, state_at
from escrow.store import DrillRecord, KeyVersionRecord, RequestRecord, Store

NodeCount = Mapping[tuple[str, NodeState], int]


@dataclass(frozen=True)
class Tally:
    """What the metrics sample from the store at a scrape."""

    awaiting_approval: int
    nodes: NodeCount  # by (cluster, state)
    # By cluster: seconds since the least recently drilled custodian slot of its newest
    # version was drilled (or made, if never); absent for a cluster with no custodian slot.
    drill_ages: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SlotDrill:
    """A custodian slot of a key version and its last successful drill (None: never)."""

    version: KeyVersionRecord
    slot: int
    custodian: str
    last_ok_at: str | None


def plan_of(store: Store, request: RequestRecord, max_versions: int,
            now: datetime | None = None, also_approved: Collection[str] = ()) -> Plan:
    """Which shares ``request`` may have (escrow.service.plan), with the approvals of
    ``also_approved`` besides its own; as of ``now`` if given, which the cluster's deny window
    needs (without it, no request is approved by default)."""
    versions = store.list_key_versions(request.cluster_id)[:max_versions]
    approvals = store.list_approvals(request.request_id)
    by_default = now is not None and approved_by_default(
        request, approvals, store.get_cluster(request.cluster_id).approve_after_seconds, now)
    return plan(versions,
                {v.version: store.get_shares(request.cluster_id, v.version) for v in versions},
                set(approvers(approvals)) | set(also_approved), max_versions,
                by_default=by_default)


def live_requests(store: Store, now: datetime) -> list[RequestRecord]:
    """Requests still pending as of ``now`` (the store keeps expired ones as pending)."""
    return [r for r in store.list_requests(RequestState.PENDING)
            if state_at(r, now) == RequestState.PENDING]


def tally(store: Store, now: datetime, max_versions: int) -> Tally:
    """Counted from the fleet's status (escrow.service.fleet), so the metrics and the status
    page never disagree: a locked node whose request waits for custodians is ``waiting``."""
    records = fleet.read(store, max_versions)
    clusters = fleet.clusters(records, now, max_versions)
    ages: dict[str, float] = {}
    for cluster in records.clusters:
        newest = records.versions.get(cluster.cluster_id, ())[:1]
        age = oldest_drill_age(drill_slots(newest, store.list_drills(cluster.cluster_id)), now)
        if age is not None:
            ages[cluster.cluster_id] = age
    return Tally(sum(len(c.requests) for c in clusters),
                 dict(Counter((c.cluster_id, n.state) for c in clusters for n in c.nodes)),
                 ages)


def drill_slots(versions: Sequence[KeyVersionRecord],
                drills: Sequence[DrillRecord]) -> list[SlotDrill]:
    """Every custodian slot of ``versions`` (in their order), with its last successful drill
    among ``drills``. A version's slots are its policy's, in the order its shares were
    made."""
    last = {(d.version, d.slot): d.last_ok_at for d in drills}
    return [SlotDrill(version, slot, holder, last.get((version.version, slot)))
            for version in versions for slot, holder in enumerate(version.policy.slots)
            if holder != AUTO]


def oldest_drill_age(slots: Sequence[SlotDrill], now: datetime) -> float | None:
    """Seconds since the least recently drilled of ``slots`` was drilled, a slot never
    drilled counting from its version's creation: what a site alerts on."""
    moments = [parse_timestamp(s.last_ok_at or s.version.created_at) for s in slots]
    return max((now - moment).total_seconds() for moment in moments) if moments else None
