"""A copy of every committed audit record in the systemd journal, outside the database.

Someone who can write the database can rebuild the audit chain (docs/threat-model.md); the
journal copy, with each record's hash, is what such a rebuild cannot reach. Without journald
(tests, a terminal with no systemd) the message is dropped, and the database stays the record.
"""

from __future__ import annotations

import systemd.journal

from escrow.audit import AuditRecord

IDENTIFIER = "escrow-audit"


def send(record: AuditRecord) -> None:
    cluster = f" cluster {record.cluster_id}" if record.cluster_id else ""
    systemd.journal.send(
        f"audit #{record.seq} {record.event} by {record.actor}{cluster}",
        SYSLOG_IDENTIFIER=IDENTIFIER, AUDIT_SEQ=str(record.seq), AUDIT_EVENT=record.event,
        AUDIT_ACTOR=record.actor, AUDIT_CLUSTER_ID=record.cluster_id,
        AUDIT_DETAILS=record.details_json, AUDIT_PREV_HASH=record.prev_hash,
        AUDIT_HASH=record.hash,
        # Named here, or python-systemd walks the stack for them at every record.
        CODE_FILE=__file__, CODE_FUNC="send")
