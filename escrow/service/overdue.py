"""What time alone brings about (pure): pending requests that expired, and active nodes whose
heartbeats stopped. The server asks every few seconds for what fell due since it last asked
(``start <= moment < now``), so that each occurrence is found once per replica, and claimed
once among them (escrow.notifications.events).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime

from escrow.core.states import NodeStatus, RequestState
from escrow.core.timestamps import parse_timestamp
from escrow.service.liveness import silent_at
from escrow.store import HeartbeatRecord, NodeRecord, RequestRecord


def expired(pending: Sequence[RequestRecord], start: datetime,
            now: datetime) -> list[RequestRecord]:
    """The requests stored as pending (never decided, completed or revoked) whose expiry
    passed in [start, now)."""
    return [r for r in pending if r.state == RequestState.PENDING
            and start <= parse_timestamp(r.expires_at) < now]


def went_silent(nodes: Sequence[NodeRecord], latest: Mapping[tuple[str, str], HeartbeatRecord],
                start: datetime, now: datetime,
                ) -> Iterator[tuple[NodeRecord, HeartbeatRecord, datetime]]:
    """Active nodes that became unreachable in [start, now) for want of a beat after their
    latest one: (node, that beat, when). A goodbye counts from the same moment, so a clean
    reboot that beats again within three intervals is no event; a node that never beat was
    never reachable, and is none either."""
    for node in nodes:
        beat = latest.get((node.cluster_id, node.node_id))
        if node.status == NodeStatus.ACTIVE and beat is not None:
            moment = silent_at(beat)
            if start <= moment < now:
                yield node, beat, moment
