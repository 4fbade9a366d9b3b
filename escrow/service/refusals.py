"""Where a refusal goes: before the caller proved who it is, a counter (never the audit log, so
a flood of strangers writes nothing); after, the audit log (docs/threat-model.md, "Anyone who
can reach the escrow"), and for a node's refusal the receivers of ``refused`` events."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from escrow.audit import AuditEvent
from escrow.core.errors import DiskFull, EscrowError, reason_of
from escrow.notifications import events
from escrow.notifications.events import Event
from escrow.store import Store

log = logging.getLogger("escrow.service")

Unidentified = Callable[[str, str, str], None]  # (action, reason, source)


class Refusals:
    def __init__(self, store: Store, room: Callable[[], None],
                 on_unidentified: Unidentified, on_event: Callable[[Event], None],
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.room = room  # raises DiskFull when new data must be refused (escrow.diskspace)
        self.on_unidentified = on_unidentified
        self.on_event = on_event
        self.clock = clock

    @contextmanager
    def counted(self, action: str, source: str) -> Iterator[None]:
        """Refusals of a caller not yet identified: counted, not written."""
        try:
            yield
        except EscrowError as error:
            self.on_unidentified(action, reason_of(error), source)
            raise

    @contextmanager
    def audited(self, action: str, cluster_id: str, **details: object) -> Iterator[None]:
        """Refusals of an identified party: each one an audit record."""
        try:
            yield
        except EscrowError as error:
            self.audit(action, error, cluster_id, **details)
            raise

    def audit(self, action: str, error: EscrowError, cluster_id: str, **details: object) -> None:
        """Audit a refusal, unless the disk is too full for new data: then it goes to the log
        only, and the space stays for releases."""
        event = AuditEvent(f"{action}.refused", "escrow", cluster_id,
                           {"reason": reason_of(error), "message": error.message, **details})
        try:
            self.room()
            self.store.append_audit(event)
        except DiskFull:
            log.warning("not audited for lack of disk space: %s refused (%s) in %s",
                        action, reason_of(error), cluster_id or "-")
        node_id = details.get("node_id")
        if isinstance(node_id, str) and node_id:  # a node's request, not a custodian's
            hostname, request_id = details.get("hostname"), details.get("request_id")
            self.on_event(events.refused(
                action, reason_of(error), error.message, cluster_id, node_id,
                hostname if isinstance(hostname, str) else "",
                request_id if isinstance(request_id, str) else "", self.clock()))
