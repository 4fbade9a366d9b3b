from __future__ import annotations

from dataclasses import replace

from escrow import audit
from escrow.audit import AuditEvent, AuditRecord


def chain(count: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = audit.GENESIS
    for seq in range(1, count + 1):
        record = audit.seal(AuditEvent(f"event.{seq}", "test", "c", {"n": seq}),
                            f"2026-11-01T00:00:{seq:02d}", prev, seq)
        records.append(record)
        prev = record.hash
    return records


def test_an_untouched_chain_verifies() -> None:
    assert audit.verify(chain(6)) == []


def test_an_edited_record_is_named() -> None:
    records = chain(5)
    records[2] = replace(records[2], details_json='{"n":99}')
    problems = audit.verify(records)
    assert [(p.seq, p.kind) for p in problems] == [(3, "edited")]


def test_a_rewritten_record_with_recomputed_hash_is_named() -> None:
    records = chain(5)
    forged = audit.seal(AuditEvent("event.3", "attacker", "c", {"n": 3}),
                        records[2].timestamp, records[1].hash, 3)
    records[2] = forged
    problems = audit.verify(records)
    assert [(p.seq, p.kind) for p in problems] == [(3, "edited")]
    assert "recomputed" in problems[0].message


def test_a_deleted_record_is_reported_with_its_neighbours() -> None:
    records = chain(5)
    del records[2]
    problems = audit.verify(records)
    assert [(p.seq, p.kind) for p in problems] == [(4, "deleted")]
    assert "between record 2 and record 4" in problems[0].message


def test_deleting_the_first_record_is_detected() -> None:
    problems = audit.verify(chain(3)[1:])
    assert [(p.seq, p.kind) for p in problems] == [(2, "deleted")]


def test_reordered_records_are_reported_as_out_of_order() -> None:
    records = chain(5)
    third, fourth = records[2], records[3]
    records[2] = replace(fourth, seq=3)
    records[3] = replace(third, seq=4)
    problems = audit.verify(records)
    assert {p.kind for p in problems} == {"reordered"}
    assert "record 3 (event.4) is out of order" in problems[0].message
