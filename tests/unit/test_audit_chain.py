from __future__ import annotations

import hashlib
import random
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace

import pytest

from escrow import audit
from escrow.audit import AuditEvent, AuditRecord


def chain(count: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = audit.GENESIS
    for seq in range(1, count + 1):
        record = audit.chained(AuditEvent(f"event.{seq}", "test", "c", {"n": seq}),
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
    forged = audit.chained(AuditEvent("event.3", "attacker", "c", {"n": 3}),
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


# -- one pass, flat memory ----------------------------------------------------------------------

def whole_log_verify(records: list[AuditRecord]) -> list[audit.ChainProblem]:
    """The verifier as it was before streaming: a lookup of every record by hash. The streaming
    one must report exactly what this one does."""
    problems: list[audit.ChainProblem] = []
    by_hash = {r.hash: r for r in records}
    expected_prev = audit.GENESIS
    previous: AuditRecord | None = None
    for record in records:
        recomputed = audit.record_hash(record.prev_hash, record.timestamp, record.event,
                                       record.actor, record.cluster_id, record.details_json)
        if recomputed != record.hash:
            problems.append(audit.ChainProblem(
                record.seq, "edited", f"record {record.seq} ({record.event}) was edited: its "
                "content no longer matches its hash"))
        elif record.prev_hash != expected_prev:
            linked = by_hash.get(record.prev_hash)
            if linked is not None:
                problems.append(audit.ChainProblem(
                    record.seq, "reordered", f"record {record.seq} ({record.event}) is out of "
                    f"order: it was written right after record {linked.seq}"))
            elif record.prev_hash == audit.GENESIS:
                problems.append(audit.ChainProblem(
                    record.seq, "reordered",
                    f"record {record.seq} ({record.event}) claims to be the first record"))
            elif previous is not None and record.seq == previous.seq + 1:
                problems.append(audit.ChainProblem(
                    previous.seq, "edited", f"record {previous.seq} ({previous.event}) was "
                    f"rewritten with a recomputed hash: record {record.seq} links to a "
                    "different version of it"))
            else:
                after = f"record {previous.seq}" if previous is not None else "the start"
                problems.append(audit.ChainProblem(
                    record.seq, "deleted", f"records between {after} and record {record.seq} "
                    f"({record.event}) were deleted: the record it links to is gone"))
        expected_prev = record.hash
        previous = record
    return problems


def tamper(records: list[AuditRecord], rng: random.Random) -> None:
    """One edit, rewrite, deletion, move or swap at a random place."""
    kind = rng.choice(["edit", "rewrite", "delete", "move", "swap"])
    i = rng.randrange(len(records))
    if kind == "edit":
        records[i] = replace(records[i], actor="attacker")
    elif kind == "rewrite":
        old = records[i]
        records[i] = audit.chained(AuditEvent(old.event, "attacker", old.cluster_id, {"n": -1}),
                                old.timestamp, old.prev_hash, old.seq)
    elif kind == "delete":
        del records[i:i + rng.randint(1, 3)]
    elif kind == "move":
        records.insert(rng.randrange(len(records)), records.pop(i))
    else:
        j = rng.randrange(len(records))
        records[i], records[j] = records[j], records[i]


def test_streaming_verify_reports_what_a_whole_log_lookup_reports() -> None:
    rng = random.Random(20261101)
    for _ in range(2000):
        records = chain(rng.randint(2, 12))
        for _ in range(rng.randint(1, 3)):
            if len(records) > 1:
                tamper(records, rng)
        assert audit.verify(iter(records)) == whole_log_verify(records), records


def test_verify_and_head_take_a_one_shot_iterator() -> None:
    records = chain(30)
    assert audit.verify(r for r in records) == []
    assert audit.head(r for r in records) == records[-1].hash
    assert audit.head(iter(())) == audit.GENESIS
    del records[10]
    assert [(p.seq, p.kind) for p in audit.verify(r for r in records)] == [(12, "deleted")]


def generated(count: int) -> Iterator[AuditRecord]:
    prev = audit.GENESIS
    for seq in range(1, count + 1):
        record = audit.chained(AuditEvent("unseal.refused", "agent", "c", {"n": seq}),
                            f"2026-11-01T00:00:00.{seq:06d}", prev, seq)
        prev = record.hash
        yield record


def test_verifying_a_long_log_holds_no_list_of_it() -> None:
    count = 10_000
    tracemalloc.start()
    try:
        records = list(generated(count))
        assert audit.verify(records) == []
        as_list = tracemalloc.get_traced_memory()[1]
        del records
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        assert audit.verify(generated(count)) == []
        streamed = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert streamed < 256 * 1024, streamed  # a handful of records, whatever the count
    print(f'peak: {as_list} bytes as a list, {streamed} streamed')
    assert streamed * 20 < as_list, (streamed, as_list)


# -- checkpoints and archives ---------------------------------------------------------------------

def archived(total: int, cut: int) -> tuple[list[AuditRecord], audit.Checkpoint,
                                            list[AuditRecord]]:
    """A log of ``total`` records whose first ``cut`` were archived: (the archived records, the
    checkpoint, the database's records ending with the audit.archive record that backs it)."""
    records = chain(total)
    checkpoint = audit.Checkpoint(cut, records[cut - 1].hash, 1, cut, "a1.jsonl", "ab" * 32,
                                  "2026-11-09T00:00:00")
    record = audit.chained(AuditEvent(audit.ARCHIVE_EVENT, "test", "", checkpoint.details()),
                        "2026-11-09T00:00:00", records[-1].hash, total + 1)
    return records[:cut], checkpoint, [*records[cut:], record]


def test_a_database_verifies_from_its_archive_checkpoint() -> None:
    _, checkpoint, database = archived(10, 4)
    assert audit.verify(database, checkpoint) == []
    problems = audit.verify(database)  # without the checkpoint the cut looks like a deletion
    assert [(p.seq, p.kind) for p in problems] == [(5, "deleted")]


def test_a_forged_checkpoint_hash_is_reported_as_a_deletion() -> None:
    _, checkpoint, database = archived(10, 4)
    forged = replace(checkpoint, hash="f" * 64)
    problems = audit.verify(database, forged)
    assert [(p.seq, p.kind) for p in problems] == [(5, "deleted"), (4, "checkpoint")]
    assert f"between the archive checkpoint at seq 4, hash {'f' * 64}" in problems[0].message


def test_a_checkpoint_without_its_archive_record_is_reported() -> None:
    """Someone who deletes old records and inserts a matching checkpoint row by hand cannot
    also add the audit.archive record without rewriting every hash after it."""
    records = chain(10)
    checkpoint = audit.Checkpoint(4, records[3].hash, 1, 4, "a1.jsonl", "ab" * 32, "t")
    problems = audit.verify(records[4:], checkpoint)
    assert [(p.seq, p.kind) for p in problems] == [(4, "checkpoint")]
    assert "has no audit.archive record after it" in problems[0].message
    other = audit.verify(archived(10, 4)[2], replace(checkpoint, archive_sha256="cd" * 32))
    assert [(p.seq, p.kind) for p in other] == [(4, "checkpoint")]


def archive_lines(records: list[AuditRecord]) -> list[bytes]:
    body = [audit.archive_line(r) for r in records]
    header = audit.ArchiveHeader(records[0].seq, records[-1].seq, len(records),
                                 records[0].prev_hash, records[-1].hash,
                                 hashlib.sha256(b"".join(body)).hexdigest(), "t")
    return [header.line(), *body]


def read_archive(lines: list[bytes]) -> tuple[audit.ArchiveReader, list[AuditRecord]]:
    reader = audit.ArchiveReader("a1.jsonl", lines)
    return reader, list(reader.records())


def test_an_archive_line_keeps_every_hashed_field() -> None:
    records = chain(5)
    reader, read = read_archive(archive_lines(records))
    assert read == records
    assert reader.problems == []
    assert reader.file_sha256 == hashlib.sha256(b"".join(archive_lines(records))).hexdigest()


def test_archives_and_the_database_verify_as_one_chain() -> None:
    archive, checkpoint, database = archived(10, 4)
    _, read = read_archive(archive_lines(archive))
    chain_ = audit.ChainVerifier()
    chain_.expect_archive_record(checkpoint)
    for record in [*read, *database]:
        chain_.add(record)
    assert chain_.finish() == []
    assert (chain_.first_seq, chain_.last_seq, chain_.records) == (1, 11, 11)


def test_an_archive_with_an_edited_line_is_reported() -> None:
    archive, _, database = archived(10, 4)
    lines = archive_lines(archive)
    lines[2] = lines[2].replace(b'"actor":"test"', b'"actor":"someone-else"')
    reader, read = read_archive(lines)
    problems = audit.verify([*read, *database])
    assert [(p.seq, p.kind) for p in problems] == [(2, "edited")]
    assert [p.kind for p in reader.problems] == ["archive"]
    assert "do not match the SHA-256 in its header" in reader.problems[0].message
    assert reader.file_sha256 != hashlib.sha256(b"".join(archive_lines(archive))).hexdigest()


def test_a_gap_between_archive_and_database_is_reported() -> None:
    archive, _, database = archived(10, 4)
    problems = audit.verify([*archive, *database[2:]])
    assert [(p.seq, p.kind) for p in problems] == [(7, "deleted")]
    assert "records between record 4 and record 7" in problems[0].message


def test_an_archive_whose_lines_disagree_with_its_header_is_reported() -> None:
    records = chain(5)
    lines = archive_lines(records)
    reader, read = read_archive([*lines[:-1], b"not json\n"])
    assert len(read) == 4
    assert reader.problems[0].message == "line 6 of a1.jsonl is not an audit record"
    assert any("holds 4 records (1..4), its header says 5 (1..5)" in p.message
               for p in reader.problems)


@pytest.mark.parametrize("first", [b"", b"{}\n", b'{"format":"escrow-audit-archive"}\n',
                                   b"\xff\n", b"[[[[\n"])
def test_a_file_that_is_not_an_archive_is_refused(first: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the CLI names the file, not the reason
        audit.ArchiveReader("x", [first])
