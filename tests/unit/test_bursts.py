"""Which pending requests `escrow requests` shows as managers of one cluster locked together."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from escrow.core import bursts
from escrow.core.protocol import PendingRequest

T0 = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)


def pending(cluster: str, node: str, minutes: float) -> PendingRequest:
    created = T0 + timedelta(minutes=minutes)
    return PendingRequest(
        request_id=f"r-{cluster}{node}", cluster_id=cluster, node_id=node, hostname=node,
        boot_id="b", source="10.0.0.1", created_at=created.isoformat(),
        expires_at=(created + timedelta(minutes=15)).isoformat(), approvals=[], threshold=2,
        needed=1, cert_not_after=T0.isoformat(), cert_sha256="0" * 64, cert_serial="1",
        ephemeral_public_key="", eligible=True)


def test_managers_of_one_cluster_asking_within_minutes_locked_together() -> None:
    [group] = bursts.by_cluster([pending("c", "n2", 3), pending("c", "n1", 0),
                                 pending("c", "n3", 9)])
    assert [r.node_id for r in group.requests] == ["n1", "n2", "n3"]
    assert group.locked_together
    assert group.nodes == 3
    assert group.span == timedelta(minutes=9)


def test_restarts_far_apart_or_of_one_node_are_not_a_power_cut() -> None:
    apart, alone = bursts.by_cluster([pending("a", "n1", 0), pending("a", "n2", 11),
                                      pending("b", "n1", 1)])
    assert (apart.cluster_id, apart.locked_together) == ("a", False)
    assert (alone.cluster_id, alone.locked_together) == ("b", False)
    [again] = bursts.by_cluster([pending("c", "n1", 0), pending("c", "n1", 1)])
    assert not again.locked_together  # one manager asking twice is not several managers


def test_clusters_come_in_order_of_their_oldest_request() -> None:
    groups = bursts.by_cluster([pending("late", "n1", 5), pending("early", "n1", 1),
                                pending("late", "n2", 0.5)])
    assert [g.cluster_id for g in groups] == ["late", "early"]
