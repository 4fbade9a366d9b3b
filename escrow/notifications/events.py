"""The events a receiver can hear of, made from the records they are about (pure).

Each event has an identity (:attr:`Event.once`): what makes it this occurrence and no other.
Every replica that sees the same occurrence (an expiry, a node gone silent: each replica's
periodic check finds them) makes the same identity, hence the same :attr:`Event.id`, which
receivers may de-duplicate on, and the same :attr:`Event.claim_key`, under which one replica
alone claims the sending (``Store.use_once``). The time an event was seen is not part of it,
as the replicas' clocks and checks differ.

Events that can repeat fast at a node's will (refusals, the alerts a node's deposits raise)
are told at most once per :data:`REPEAT_SECONDS` per kind, node and reason: the window's number
is part of their identity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from escrow.audit import AuditEvent
from escrow.core.encoding import FieldValue, canonical_json, encode
from escrow.core.states import Decision
from escrow.core.timestamps import parse_timestamp
from escrow.store import HeartbeatRecord, NodeRecord, RequestRecord

EVENT_DOMAIN = "swarm-unseal/v1/notification"
REPEAT_SECONDS = 900
CLONE_SUSPECTED_ALERT = "node.clone_suspected"


class EventKind(StrEnum):
    """What a receiver can ask for (``events`` of a ``[[webhooks]]`` table)."""

    REQUESTED = "requested"  # an unseal request needs custodian approvals
    APPROVED = "approved"  # a custodian approved a request
    DENIED = "denied"  # a custodian denied one
    EXPIRED = "expired"  # a pending request passed its expiry without being decided
    UNLOCKED = "unlocked"  # an agent reported its manager unlocked
    REFUSED = "refused"  # an identified node's request was refused
    CLONE_SUSPECTED = "clone_suspected"  # two machines carry one node's identity
    NODE_UNREACHABLE = "node_unreachable"  # an active node's heartbeats stopped
    ALERT = "alert"  # another audited event worth a page (key.versions_full, key.unconfirmed)


# Found by the server's periodic check, not by a request: the check runs only for these.
TIMED = frozenset({EventKind.EXPIRED, EventKind.NODE_UNREACHABLE})


@dataclass(frozen=True)
class Event:
    kind: EventKind
    time: datetime  # when it happened (for an expiry or a silence: when it became due)
    cluster_id: str
    once: tuple[FieldValue, ...]  # its identity, beside its kind (module docstring)
    node_id: str = ""
    hostname: str = ""
    request_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)  # the kind's own fields

    @property
    def claim_key(self) -> bytes:
        return hashlib.sha256(encode(EVENT_DOMAIN, self.kind, *self.once)).digest()

    @property
    def id(self) -> str:
        return "ev-" + self.claim_key.hex()[:32]


def _window(now: datetime) -> int:
    return int(now.timestamp()) // REPEAT_SECONDS


def requested(request: RequestRecord, needed: int, now: datetime,
              approves_by_default_at: str = "") -> Event:
    """``approves_by_default_at``: when the cluster's deny window lets the request proceed
    unless a custodian denies it ('' without one, and the field is left out)."""
    details: dict[str, Any] = {"needed": needed, "expires_at": request.expires_at}
    if approves_by_default_at:
        details["approves_by_default_at"] = approves_by_default_at
    return Event(EventKind.REQUESTED, now, request.cluster_id, (request.request_id,),
                 request.node_id, request.hostname, request.request_id, details)


def decided(request: RequestRecord, decision: Decision, custodian: str, reason: str,
            approvals: int, needed: int, now: datetime) -> Event:
    """A custodian's approval or denial of ``request``; ``approvals`` and ``needed`` as they
    stand after it."""
    if decision == Decision.APPROVE:
        return Event(EventKind.APPROVED, now, request.cluster_id,
                     (request.request_id, custodian), request.node_id, request.hostname,
                     request.request_id,
                     {"custodian": custodian, "approvals": approvals, "needed": needed})
    return Event(EventKind.DENIED, now, request.cluster_id, (request.request_id, custodian),
                 request.node_id, request.hostname, request.request_id,
                 {"custodian": custodian, "reason": reason})


def expired(request: RequestRecord, needed: int) -> Event:
    """``request`` expired while pending, ``needed`` approvals short (0: it needed none, and
    no unlock was reported)."""
    return Event(EventKind.EXPIRED, parse_timestamp(request.expires_at), request.cluster_id,
                 (request.request_id,), request.node_id, request.hostname, request.request_id,
                 {"needed": needed, "expires_at": request.expires_at})


def unlocked(request: RequestRecord, version: int, now: datetime) -> Event:
    return Event(EventKind.UNLOCKED, now, request.cluster_id, (request.request_id,),
                 request.node_id, request.hostname, request.request_id, {"version": version})


def refused(action: str, reason: str, message: str, cluster_id: str, node_id: str,
            hostname: str, request_id: str, now: datetime) -> Event:
    return Event(EventKind.REFUSED, now, cluster_id,
                 (cluster_id, node_id, action, reason, _window(now)), node_id, hostname,
                 request_id, {"action": action, "reason": reason, "message": message})


def node_unreachable(node: NodeRecord, beat: HeartbeatRecord, silent_at: datetime) -> Event:
    """``node`` sent nothing for three of its intervals after ``beat``; the next beat, of any
    boot, makes a new occurrence."""
    return Event(EventKind.NODE_UNREACHABLE, silent_at, node.cluster_id,
                 (node.cluster_id, node.node_id, beat.boot_id, beat.last_at), node.node_id,
                 node.hostname, "",
                 {"boot_id": beat.boot_id, "last_seen": beat.last_at, "goodbye": beat.goodbye,
                  "interval_seconds": beat.interval_seconds})


def from_alert(alert: AuditEvent, now: datetime) -> Event:
    """An audited event worth a page: a suspected clone as such, any other as an alert."""
    node_id = alert.details.get("node_id")
    node_id = node_id if isinstance(node_id, str) else ""
    hostname = alert.details.get("hostname")
    request_id = alert.details.get("request_id")
    details = {"alert": alert.event, "details": dict(alert.details)}
    if alert.event == CLONE_SUSPECTED_ALERT:
        # A quarantine happens once, until an admin re-admits the node: the moment tells two
        # quarantines of one boot apart.
        return Event(EventKind.CLONE_SUSPECTED, now, alert.cluster_id,
                     (alert.cluster_id, node_id, canonical_json(details), now.isoformat()),
                     node_id, hostname if isinstance(hostname, str) else "", "", details)
    return Event(EventKind.ALERT, now, alert.cluster_id,
                 (alert.event, alert.cluster_id, alert.actor, canonical_json(details),
                  _window(now)),
                 node_id, hostname if isinstance(hostname, str) else "",
                 request_id if isinstance(request_id, str) else "", details)
