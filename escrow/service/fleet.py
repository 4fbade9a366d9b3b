"""The fleet's status (escrow.core.fleet) from the store's records and the clock: read at the
edge (:func:`read`), decided here (:func:`clusters`), pure. It needs no token, so on-call sees
the fleet while the HSM is down too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from escrow.core.fleet import FleetCluster, FleetKeyVersion, FleetNode, FleetRequest
from escrow.core.states import Liveness, NodeState, NodeStatus, RequestState
from escrow.core.timestamps import timestamp
from escrow.service import liveness
from escrow.service.plan import approved_by_default, approvers, default_approval_at, plan, state_at
from escrow.store import (
    ApprovalRecord,
    ClusterRecord,
    HeartbeatRecord,
    KeyVersionRecord,
    NodeRecord,
    RequestRecord,
    ShareRecord,
    Store,
    Unlock,
)


@dataclass(frozen=True)
class FleetRecords:
    """What the status is made of, as the store holds it."""

    clusters: Sequence[ClusterRecord]
    nodes: Sequence[NodeRecord]
    beats: Mapping[tuple[str, str], HeartbeatRecord]  # each node's latest
    pending: Sequence[RequestRecord]  # stored as pending (some may have expired since)
    approvals: Mapping[str, Sequence[ApprovalRecord]]  # by request id
    versions: Mapping[str, Sequence[KeyVersionRecord]]  # by cluster, newest first
    shares: Mapping[tuple[str, int], Sequence[ShareRecord]]  # by (cluster, version)
    unlocks: Mapping[str, Mapping[str, Unlock]]  # by cluster, then node


def read(store: Store, max_versions: int) -> FleetRecords:
    clusters = store.list_clusters()
    versions = {c.cluster_id: store.list_key_versions(c.cluster_id)[:max_versions]
                for c in clusters}
    pending = store.list_requests(RequestState.PENDING)
    return FleetRecords(
        clusters, store.list_nodes(), store.latest_heartbeats(), pending,
        {r.request_id: store.list_approvals(r.request_id) for r in pending}, versions,
        {(cluster_id, v.version): store.get_shares(cluster_id, v.version)
         for cluster_id, kept in versions.items() for v in kept},
        {c.cluster_id: store.last_unlocks(c.cluster_id) for c in clusters})


def clusters(records: FleetRecords, now: datetime, max_versions: int) -> list[FleetCluster]:
    """Every cluster, its managers and the requests that wait for custodians, as of ``now``."""
    return [_cluster(records, cluster, now, max_versions) for cluster in records.clusters]


def _cluster(records: FleetRecords, cluster: ClusterRecord, now: datetime,
             max_versions: int) -> FleetCluster:
    cluster_id = cluster.cluster_id
    versions = records.versions.get(cluster_id, ())
    live = [_request(records, request, versions, max_versions, cluster, now)
            for request in records.pending
            if request.cluster_id == cluster_id and state_at(request, now) == RequestState.PENDING]
    waiting = [request for request in live if request.needed > 0]
    unlocks = records.unlocks.get(cluster_id, {})
    nodes = [_node(node, records.beats.get((cluster_id, node.node_id)), unlocks.get(node.node_id),
                   waiting, now)
             for node in records.nodes if node.cluster_id == cluster_id]
    return FleetCluster(
        cluster_id=cluster_id, threshold=cluster.policy.threshold,
        slots=list(cluster.policy.slots),
        versions=[FleetKeyVersion(version=v.version, created_at=v.created_at,
                                  threshold=v.policy.threshold, slots=list(v.policy.slots))
                  for v in versions],
        nodes=sorted(nodes, key=lambda n: (n.hostname, n.node_id)), requests=waiting)


def _request(records: FleetRecords, request: RequestRecord,
             versions: Sequence[KeyVersionRecord], max_versions: int, cluster: ClusterRecord,
             now: datetime) -> FleetRequest:
    decisions = records.approvals.get(request.request_id, ())
    approved = approvers(decisions)
    planned = plan(versions, {v.version: records.shares.get((request.cluster_id, v.version), ())
                              for v in versions}, set(approved), max_versions,
                   by_default=approved_by_default(request, decisions,
                                                  cluster.approve_after_seconds, now))
    by_default = default_approval_at(request, cluster.approve_after_seconds)
    holders = sorted({slot for v in versions for slot in v.policy.custodians})
    return FleetRequest(
        request_id=request.request_id, node_id=request.node_id, hostname=request.hostname,
        created_at=request.created_at, expires_at=request.expires_at,
        held_until=request.held_until, threshold=planned.threshold, needed=planned.needed,
        approved_by=approved,
        could_approve=[c for c in holders if c not in approved and planned.eligible(c)],
        approves_by_default_at=timestamp(by_default) if by_default else "")


def _node(node: NodeRecord, beat: HeartbeatRecord | None, unlock: Unlock | None,
          waiting: Sequence[FleetRequest], now: datetime) -> FleetNode:
    waits = next((r.request_id for r in waiting if r.node_id == node.node_id), "")
    return FleetNode(
        node_id=node.node_id, hostname=node.hostname, state=_state(node, beat, waits, now),
        last_seen=beat.last_at if beat else "", kek_version=beat.kek_version if beat else "",
        agent_version=beat.agent_version if beat else "",
        last_unlock=unlock.at if unlock else "",
        last_unlock_version=unlock.version if unlock else None, waiting_on=waits)


def _state(node: NodeRecord, beat: HeartbeatRecord | None, waits: str,
           now: datetime) -> NodeState:
    if node.status != NodeStatus.ACTIVE:
        return NodeState(node.status.value)
    if waits:  # a request short of approvals: its agent is asking, whatever its last beat
        return NodeState.WAITING
    seen = liveness.liveness(beat, now)
    return NodeState.UNREACHABLE if seen == Liveness.UNREACHABLE else NodeState(seen.value)
