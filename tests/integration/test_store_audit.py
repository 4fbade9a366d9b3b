"""The audit chain as every store keeps it (the `store` fixture: SQLite and PostgreSQL): records
numbered without gaps, a rolled-back change leaving none, archive checkpoints that let only the
records they cover go."""

from __future__ import annotations

import pytest

from escrow import audit
from escrow.audit import AuditEvent
from escrow.core.errors import Conflict, StoreError
from escrow.store import CustodianRecord
from escrow.store.sql import SqlStore
from lab.custodians import public_key_pem


def test_a_refused_change_leaves_no_gap_in_the_chain(store: SqlStore) -> None:
    store.add_custodian(CustodianRecord("alice", public_key_pem().decode(), "t"),
                        AuditEvent("custodian.add", "test"))
    with pytest.raises(Conflict):
        store.add_custodian(CustodianRecord("alice", public_key_pem().decode(), "t"),
                            AuditEvent("custodian.add", "test"))
    store.append_audit(AuditEvent("test.after", "test"))
    records = list(store.iter_audit())
    assert [r.seq for r in records] == [1, 2]
    assert audit.verify(records) == []


def test_an_archive_lets_only_its_records_go_and_the_chain_continues(store: SqlStore) -> None:
    for index in range(5):
        store.append_audit(AuditEvent("test.record", "test", details={"index": index}))
    third = list(store.iter_audit())[2]
    checkpoint = audit.Checkpoint(third.seq, third.hash, 1, 3, "audit-1.jsonl", "0" * 64, "t")
    store.archive_audit(checkpoint, AuditEvent("audit.archive", "test"))
    with store.audit_snapshot():
        (kept,) = store.audit_checkpoints()
        left = list(store.iter_audit())
    assert [r.seq for r in left] == [4, 5, 6]
    assert audit.verify(left, kept) == []
    store.append_audit(AuditEvent("test.later", "test"))
    assert [r.seq for r in store.iter_audit(after_seq=5)] == [6, 7]


def test_a_forged_checkpoint_is_refused_by_the_database(store: SqlStore) -> None:
    store.append_audit(AuditEvent("test.record", "test"))
    forged = audit.Checkpoint(1, "f" * 64, 1, 1, "forged.jsonl", "0" * 64, "t")
    with pytest.raises((Conflict, StoreError)):
        store.archive_audit(forged, AuditEvent("audit.archive", "test"))
    assert [r.event for r in store.iter_audit()] == ["test.record"]
