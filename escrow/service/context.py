"""What every part of the service is given: the store, the vault, the settings, the clock,
and the hooks into the server (metrics, disk reserve, alerts and notifications)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from escrow.audit import AuditEvent
from escrow.config import ServerSettings
from escrow.core.states import Decision
from escrow.core.timestamps import timestamp
from escrow.notifications.events import Event
from escrow.service import readings
from escrow.service.plan import Plan, approvers, default_approval_at
from escrow.service.refusals import Refusals
from escrow.store import RequestRecord, Store
from escrow.vault import Vault


@dataclass(frozen=True)
class Hooks:
    on_release: Callable[[int], None]  # gets the count of shares released for the first time
    room: Callable[[], None]  # raises DiskFull when new data must be refused (escrow.diskspace)
    on_alert: Callable[[AuditEvent], None]  # an audited event on-call should hear about
    on_event: Callable[[Event], None]  # an event receivers may hear of (escrow.notifications)
    # Called before an identified party's write on the way to a release (the request, the
    # release, an approval, the result): the disk reserve is for these alone.
    for_release: Callable[[], None]


@dataclass(frozen=True)
class Context:
    vault: Vault
    settings: ServerSettings
    hooks: Hooks
    refusals: Refusals

    @property
    def store(self) -> Store:
        return self.vault.store

    def now(self) -> datetime:
        return self.vault.clock()

    def plan(self, request: RequestRecord, also_approved: Collection[str] = ()) -> Plan:
        """Which shares ``request`` may have now (escrow.service.plan), counting the
        approvals of ``also_approved`` (a window's signers, before they are written)."""
        return readings.plan_of(self.store, request, self.settings.max_versions, self.now(),
                                also_approved)

    def approvers(self, request_id: str) -> list[str]:
        return approvers(self.store.list_approvals(request_id))

    def approves_by_default_at(self, request: RequestRecord) -> str:
        """When the cluster's deny window approves ``request`` unless a custodian denies it
        ('' without one, or once denied)."""
        at = default_approval_at(
            request, self.store.get_cluster(request.cluster_id).approve_after_seconds)
        denied = any(a.decision == Decision.DENY
                     for a in self.store.list_approvals(request.request_id))
        return timestamp(at) if at is not None and not denied else ""
