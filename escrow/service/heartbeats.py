"""Heartbeats: each node's last word per boot, kept in the store, audited only when something
changes (a new boot, the lock state, a goodbye); and the clone checks they make possible
(escrow.service.liveness)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from escrow.audit import AuditEvent
from escrow.core.protocol import HeartbeatRequest
from escrow.core.states import LockState, NodeStatus
from escrow.core.timestamps import timestamp
from escrow.service import liveness
from escrow.service.authentication import VerifiedHeartbeat
from escrow.service.context import Context
from escrow.store import HeartbeatRecord, RequestRecord


def _changed(mine: HeartbeatRecord | None, beat: HeartbeatRecord) -> AuditEvent | None:
    if mine is not None and (mine.lock_state, mine.goodbye, mine.kek_version) == (
            beat.lock_state, beat.goodbye, beat.kek_version):
        return None
    return AuditEvent("node.heartbeat", f"node:{beat.node_id}", beat.cluster_id,
                      {"node_id": beat.node_id, "boot_id": beat.boot_id,
                       "lock_state": beat.lock_state, "goodbye": beat.goodbye,
                       "kek_version": beat.kek_version, "agent_version": beat.agent_version,
                       "source": beat.source, "new_boot": mine is None})


class Heartbeats:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.store = context.store

    def record(self, verified: VerifiedHeartbeat, body: HeartbeatRequest, source: str) -> None:
        now = self.context.now()
        beats = self.store.heartbeats(body.cluster_id, body.node_id)
        mine = next((b for b in beats if b.boot_id == body.boot_id), None)
        beat = HeartbeatRecord(
            body.cluster_id, body.node_id, body.boot_id,
            mine.first_at if mine else timestamp(now), timestamp(now),
            LockState(body.lock_state), body.kek_version, body.agent_version,
            body.uptime_seconds, body.interval_seconds, body.goodbye, source)
        # Liveness guards releases, so a beat may use the disk reserve kept for them.
        self.context.hooks.for_release()
        self.store.record_heartbeat(beat, _changed(mine, beat))
        if verified.node.status != NodeStatus.ACTIVE:
            return
        others = [b for b in beats if b.boot_id != beat.boot_id]
        alongside = liveness.alive_alongside(others, beat)
        copies = liveness.convicted(self.store.pending_requests_of(body.cluster_id,
                                                                   body.node_id), beat, now)
        if alongside is not None or copies:
            self._quarantine(beat, verified.node.hostname, alongside, copies)

    def hold_until(self, cluster_id: str, node_id: str, boot_id: str, now: datetime) -> str:
        """When an unseal request from ``boot_id`` may have shares: "" at once, or the end of
        one interval of the live other boot it must wait on."""
        other = liveness.holder_of(self.store.heartbeats(cluster_id, node_id), boot_id, now)
        if other is None:
            return ""
        return timestamp(now + timedelta(seconds=other.interval_seconds))

    def _quarantine(self, beat: HeartbeatRecord, hostname: str,
                    alongside: HeartbeatRecord | None,
                    copies: Sequence[RequestRecord]) -> None:
        """Two machines carry the node's identity: nothing is released to either until an
        admin re-admits the node (`escrow node allow`)."""
        suspects = ([{"boot_id": alongside.boot_id, "source": alongside.source,
                      "seen": "heartbeats"}] if alongside else [])
        suspects += [{"boot_id": r.boot_id, "source": r.source, "seen": "unseal request",
                      "request_id": r.request_id} for r in copies]
        event = AuditEvent("node.clone_suspected", "escrow", beat.cluster_id,
                           {"node_id": beat.node_id, "hostname": hostname,
                            "boot_id": beat.boot_id, "source": beat.source,
                            "alongside": suspects})
        self.store.set_node_status(beat.cluster_id, beat.node_id, NodeStatus.QUARANTINED, event)
        self.context.hooks.on_alert(event)
