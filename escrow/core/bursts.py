"""Pending requests by cluster, and whether several managers of one cluster locked together:
after a power cut every manager asks within minutes, and a custodian should see one event to
approve at once (``escrow approve --cluster C --all``), not a list of strangers (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from escrow.core.protocol import PendingRequest
from escrow.core.timestamps import parse_timestamp

# Managers whose requests all began within this span locked "together". Long enough for a
# rack's staggered power-on, short enough that two unrelated restarts an hour apart are not.
TOGETHER = timedelta(minutes=10)


@dataclass(frozen=True)
class ClusterRequests:
    cluster_id: str
    requests: tuple[PendingRequest, ...]  # oldest first

    @property
    def nodes(self) -> int:
        return len({r.node_id for r in self.requests})

    @property
    def span(self) -> timedelta:
        """From the first request to the last."""
        times = [_created(r) for r in self.requests]
        return max(times) - min(times)

    @property
    def locked_together(self) -> bool:
        """Several managers of the cluster asked within ``TOGETHER`` of each other."""
        return self.nodes > 1 and self.span <= TOGETHER


def _created(request: PendingRequest) -> datetime:
    return parse_timestamp(request.created_at)


def by_cluster(pending: Iterable[PendingRequest]) -> list[ClusterRequests]:
    """The requests of each cluster, oldest first; clusters in order of their oldest request."""
    groups: dict[str, list[PendingRequest]] = {}
    for request in sorted(pending, key=_created):
        groups.setdefault(request.cluster_id, []).append(request)
    return [ClusterRequests(cluster_id, tuple(requests))
            for cluster_id, requests in groups.items()]
